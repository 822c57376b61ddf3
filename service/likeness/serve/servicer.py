"""Thin gRPC servicer: protobuf <-> plain Python, nothing else.

Every method converts its request, calls :class:`likeness.serve.runtime.Runtime`
and converts the answer; domain errors become status codes in one place
(:mod:`likeness.serve.status`). ``create_server`` builds a server bound to an
address (port 0 picks a free one) and returns it with the bound port;
``serve`` runs one until interrupted.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from likeness.serve.auth import AuthConfig, TokenAuthInterceptor, check_auth_config, server_credentials
from likeness.config import check_seed
from likeness.errors import InvalidInput, ResourceExhausted
from likeness.serve.pb import likeness_pb2 as pb
from likeness.serve.pb import likeness_pb2_grpc as pb_grpc
from likeness.serve.runtime import Runtime
from likeness.serve.status import grpc_errors
from likeness.spec import CharacterSpec, spec_from_dict
from likeness.build.store import BuildRow, CharacterRow, EventRow

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Likeness"].full_name
_STATES = {"queued": pb.QUEUED, "running": pb.RUNNING, "succeeded": pb.SUCCEEDED,
           "failed": pb.FAILED, "cancelled": pb.CANCELLED}
_FORMATS = {pb.EMBEDDING_FORMAT_UNSPECIFIED: "safetensors", pb.A1111_PT: "a1111-pt",
            pb.SAFETENSORS: "safetensors", pb.DIFFUSERS: "diffusers"}
_FORMAT_ENUM = {"a1111-pt": pb.A1111_PT, "safetensors": pb.SAFETENSORS, "diffusers": pb.DIFFUSERS}
_SPEC_SCALARS = ("class_word", "wardrobe", "background", "template", "negative_prompt", "per_cell", "profile")
_SPEC_LISTS = ("traits", "trait_synonyms", "zooms", "angles")
_SAMPLING = ("sampler", "steps", "cfg_scale", "width", "height", "seed", "batch_size", "pad_conds",
             "restore_faces", "restore_visibility", "codeformer_weight", "rng")


# ------------------------------------------------------------------ conversions
def spec_to_dict(msg: pb.CharacterSpec) -> dict[str, Any]:
    """Only the fields the caller set; the rest take the spec's defaults."""
    data: dict[str, Any] = {"name": msg.name, "token": msg.token}
    for f in _SPEC_SCALARS:
        if msg.HasField(f):
            data[f] = getattr(msg, f)
    for f in _SPEC_LISTS:
        values = list(getattr(msg, f))
        if values:
            data[f] = values
    sampling = {f: getattr(msg.sampling, f) for f in _SAMPLING if msg.sampling.HasField(f)}
    if sampling:
        data["sampling"] = sampling
    return data


def spec_from_pb(msg: pb.CharacterSpec) -> CharacterSpec:
    return spec_from_dict(spec_to_dict(msg), where="spec")


def spec_to_pb(data: dict[str, Any]) -> pb.CharacterSpec:
    msg = pb.CharacterSpec(name=data.get("name", ""), token=data.get("token", ""))
    for f in _SPEC_SCALARS:
        if f in data:
            setattr(msg, f, data[f])
    for f in _SPEC_LISTS:
        getattr(msg, f).extend(data.get(f, []))
    for f, v in data.get("sampling", {}).items():
        setattr(msg.sampling, f, v)
    return msg


def options_to_dict(msg: pb.BuildOptions) -> dict[str, Any]:
    """Proto3 zeros mean "default": only non-zero fields override."""
    out: dict[str, Any] = {}
    for f in ("profile", "images_per_cell", "k", "training_steps", "refinement_rounds",
              "import_gallery", "train_resolution", "eval_steps", "checkpoint_every"):
        v = getattr(msg, f)
        if v:
            out[f] = v
    # Explicit presence: 0 is a real seed and a real margin.
    if msg.HasField("refinement_margin"):
        out["refinement_margin"] = msg.refinement_margin
    if msg.HasField("base_seed"):
        check_seed(msg.base_seed, "options.base_seed")
        if msg.base_seed >= 0:
            out["base_seed"] = msg.base_seed
    if msg.eval_scenes:
        out["eval_scenes"] = list(msg.eval_scenes)
    return out


def _relative_to_roots(folder: str, roots: list[str]) -> str:
    """``folder`` as a client names it: relative to the import root that holds it (no server paths)."""
    for root in roots:
        try:
            return Path(folder).relative_to(root).as_posix()
        except ValueError:
            continue
    return Path(folder).name


def options_to_pb(data: dict[str, Any]) -> pb.BuildOptions:
    msg = pb.BuildOptions()
    for k, v in data.items():
        if k == "eval_scenes":
            msg.eval_scenes.extend(v)
        elif k == "import_gallery" and v and data.get("import_roots"):
            msg.import_gallery = _relative_to_roots(v, data["import_roots"])
        elif hasattr(msg, k):
            setattr(msg, k, v)
    return msg


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def character_to_pb(row: CharacterRow) -> pb.Character:
    return pb.Character(name=row.name, spec=spec_to_pb(row.spec), create_time=row.created_at,
                        latest_build_id=row.latest_build_id)


def build_to_pb(row: BuildRow, stages: list[Any] = ()) -> pb.Build:
    msg = pb.Build(
        id=row.id, character=row.character, spec=spec_to_pb(row.spec), options=options_to_pb(row.options),
        state=_STATES.get(row.state, pb.BUILD_STATE_UNSPECIFIED), stage=row.stage, round=row.round,
        error=row.error, create_time=row.created_at, start_time=row.started_at, finish_time=row.finished_at,
        last_event=row.last_event, device=row.device,
    )
    msg.scores.update(_floats(row.result.get("scores", {})))
    for s in stages:
        msg.stages.add(round=s.round, stage=s.stage, state=s.state, update_time=s.updated_at)
    return msg


def event_to_pb(ev: EventRow) -> pb.BuildEvent:
    msg = pb.BuildEvent(build_id=ev.build_id, number=ev.number, time=ev.time, kind=ev.kind, stage=ev.stage,
                        round=ev.round, done=ev.done, total=ev.total, message=ev.message,
                        state=_STATES.get(ev.state, pb.BUILD_STATE_UNSPECIFIED))
    msg.scores.update(_floats(ev.metrics))
    return msg


def _images(items: Any) -> list[tuple[str, bytes]]:
    return [(m.name, m.data) for m in items]


# -------------------------------------------------------------------- servicer
class LikenessServicer(pb_grpc.LikenessServicer):
    """pb <-> Runtime; nothing else lives here."""

    def __init__(self, runtime: Runtime, max_watchers: int = 16, max_heavy: int = 4) -> None:
        self.rt = runtime
        # Each open WatchBuild stream holds a server thread for as long as the build runs; capped
        # so watchers can never take every thread and starve the other calls.
        self.max_watchers = max_watchers
        self._watch_slots = threading.BoundedSemaphore(max_watchers)
        # Face analysis, curation and generation hold a thread and the CPU/GPU for seconds. Measured
        # (issue 13): with 40 concurrent ScoreConsistency calls a health probe took 4-5 s and GetBuild
        # p50 went from ~0.1 s to 1.7-2.8 s, because they took every thread of the pool. Past
        # ``max_heavy`` in flight they are refused at once with RESOURCE_EXHAUSTED and a retry hint,
        # so health and reads always find a thread (scripts/bench_serve_load.py measures it).
        self.max_heavy = max_heavy
        self._heavy_slots = threading.BoundedSemaphore(max_heavy)
        # Running mean of a heavy call's duration (what a refusal's pushback is from); 1 s until one is measured.
        self._heavy_seconds: float | None = None

    def retry_after_s(self) -> float:
        """How long a refused heavy call should wait: about when the next slot frees, with jitter.

        A slot frees every (mean heavy duration / max_heavy) seconds on average; the jitter (0.5-1.5x)
        keeps refused clients from coming back in step. Clamped to 50 ms - 10 s.
        """
        base = (self._heavy_seconds or 1.0) / self.max_heavy
        return min(10.0, max(0.05, base * random.uniform(0.5, 1.5)))

    @contextmanager
    def _heavy(self, rpc: str) -> Iterator[None]:
        if not self._heavy_slots.acquire(blocking=False):
            wait = self.retry_after_s()
            raise ResourceExhausted(
                f"{rpc}: {self.max_heavy} heavy calls (ScoreConsistency, Curate, Generate) are already running on "
                f"this server, the most it runs at once so that health checks and reads stay fast; retry in "
                f"{wait:.1f} s (the grpc-retry-pushback-ms trailer says when), or run fewer calls in parallel",
                retry_after_s=wait)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._heavy_slots.release()
            # Exponential mean over the last ~10 calls; a plain float store, so no lock is needed.
            took = time.monotonic() - t0
            self._heavy_seconds = took if self._heavy_seconds is None else 0.9 * self._heavy_seconds + 0.1 * took

    @grpc_errors
    def CreateCharacter(self, request: pb.CreateCharacterRequest, context: grpc.ServicerContext) -> pb.Character:
        return character_to_pb(self.rt.create_character(spec_from_pb(request.spec)))

    @grpc_errors
    def GetCharacter(self, request: pb.GetCharacterRequest, context: grpc.ServicerContext) -> pb.Character:
        return character_to_pb(self.rt.get_character(request.name))

    @grpc_errors
    def ListCharacters(self, request: pb.ListCharactersRequest, context: grpc.ServicerContext) -> pb.ListCharactersResponse:
        return pb.ListCharactersResponse(characters=[character_to_pb(c) for c in self.rt.list_characters()])

    @grpc_errors
    def DeleteCharacter(self, request: pb.DeleteCharacterRequest, context: grpc.ServicerContext) -> pb.DeleteCharacterResponse:
        return pb.DeleteCharacterResponse(deleted=self.rt.delete_character(request.name))

    @grpc_errors
    def StartBuild(self, request: pb.StartBuildRequest, context: grpc.ServicerContext) -> pb.Build:
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidInput("StartBuild needs a character name or an inline spec")
        spec = spec_from_pb(request.spec) if source == "spec" else None
        row = self.rt.start_build(character=request.character if source == "character" else "", spec=spec,
                                  options=options_to_dict(request.options))
        return build_to_pb(row)

    @grpc_errors
    def GetBuild(self, request: pb.GetBuildRequest, context: grpc.ServicerContext) -> pb.Build:
        row = self.rt.get_build(request.id)
        return build_to_pb(row, self.rt.store.stages(row.id))

    @grpc_errors
    def ListBuilds(self, request: pb.ListBuildsRequest, context: grpc.ServicerContext) -> pb.ListBuildsResponse:
        rows = self.rt.list_builds(request.character, request.limit)
        return pb.ListBuildsResponse(builds=[build_to_pb(r) for r in rows])

    @grpc_errors
    def CancelBuild(self, request: pb.CancelBuildRequest, context: grpc.ServicerContext) -> pb.Build:
        return build_to_pb(self.rt.cancel_build(request.id))

    @grpc_errors
    def WatchBuild(self, request: pb.WatchBuildRequest, context: grpc.ServicerContext) -> Iterator[pb.BuildEvent]:
        events = self.rt.watch_build(request.id, request.after_event, active=context.is_active)
        if not self._watch_slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{self.max_watchers} WatchBuild streams are open on this server, the most it serves at once; "
                "close one, or poll GetBuild (its last_event says when there is news)")
        try:
            for ev in events:
                yield event_to_pb(ev)
        finally:
            self._watch_slots.release()

    @grpc_errors
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GeneratedImage]:
        cancel = _cancel_on_done(context)
        with self._heavy("Generate"):
            for img in self.rt.generate(
                characters=list(request.characters), prompt=request.prompt, negative_prompt=request.negative_prompt,
                sampler=request.sampler, steps=request.steps, cfg_scale=request.cfg_scale, width=request.width,
                height=request.height, seeds=list(request.seeds), count=request.count, profile=request.profile,
                cancel=cancel,
            ):
                yield pb.GeneratedImage(index=img.index, seed=img.seed, png=img.png, infotext=img.infotext)

    @grpc_errors
    def ScoreConsistency(self, request: pb.ScoreConsistencyRequest,
                         context: grpc.ServicerContext) -> pb.ScoreConsistencyResponse:
        ref = request.WhichOneof("reference")
        with self._heavy("ScoreConsistency"):
            out = self.rt.score_consistency(
                _images(request.images), character=request.character if ref == "character" else "",
                reference=_images(request.reference_images.images) if ref == "reference_images" else (),
            )
        msg = pb.ScoreConsistencyResponse(threshold=out.threshold)
        for s in out.images:
            msg.images.add(index=s.index, name=s.name, face_found=s.face_found, identity=s.identity,
                           same_identity=s.same_identity)
        msg.set_scores.update(_floats(out.set_scores))
        return msg

    @grpc_errors
    def Curate(self, request: pb.CurateRequest, context: grpc.ServicerContext) -> pb.CurateResponse:
        with self._heavy("Curate"):
            out = self.rt.curate(images=_images(request.images), gallery=request.gallery, character=request.character,
                                 k=request.k, cancel=_cancel_on_done(context))
        msg = pb.CurateResponse(warnings=list(out.warnings), k=out.k, short_of_k=out.short_of_k)
        for d in out.decisions:
            m = msg.decisions.add(index=d.index, name=d.name, kept=d.kept, reasons=list(d.reasons))
            m.scores.update(_floats(d.scores))
        msg.set_scores.update(_floats(out.set_scores))
        return msg

    @grpc_errors
    def GetEmbedding(self, request: pb.GetEmbeddingRequest, context: grpc.ServicerContext) -> pb.EmbeddingFile:
        src = request.WhichOneof("source")
        if src is None:
            raise InvalidInput("GetEmbedding needs a character or a build_id")
        if request.format not in _FORMATS:
            raise InvalidInput(f"format {request.format} is not a known EmbeddingFormat; use A1111_PT, SAFETENSORS "
                               "or DIFFUSERS")
        out = self.rt.get_embedding(build_id=request.build_id if src == "build_id" else "",
                                    character=request.character if src == "character" else "",
                                    format=_FORMATS[request.format])
        return pb.EmbeddingFile(filename=out.filename, data=out.data, format=_FORMAT_ENUM[out.format],
                                token=out.token, build_id=out.build_id)

    @grpc_errors
    def GetReport(self, request: pb.GetReportRequest, context: grpc.ServicerContext) -> pb.Report:
        out = self.rt.get_report(request.build_id)
        return pb.Report(build_id=out.build_id, json=out.json, html=out.html)


def _cancel_on_done(context: grpc.ServicerContext) -> Any:
    """A CancelToken set when the call ends early (client gone or deadline passed)."""
    from likeness.progress import CancelToken

    token = CancelToken()
    context.add_callback(lambda: token.cancel("the call ended (deadline exceeded or client cancelled)"))
    return token


# ---------------------------------------------------------------------- server
def create_server(address: str, runtime: Runtime, *, auth: AuthConfig | None = None,
                  max_workers: int = 32, max_heavy: int | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A ready (not yet started) server bound to ``address``; returns (server, port, health).

    ``max_workers`` threads serve calls; at most half of them may hold WatchBuild streams.
    """
    auth = check_auth_config(address, auth or AuthConfig())
    interceptors = [TokenAuthInterceptor(auth.token)] if auth.token else []
    size = runtime.limits.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="likeness-rpc"),
        interceptors=interceptors,
        # so_reuseport 0: a second server on a taken port must fail, not silently share its traffic.
        options=[("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_workers * 8,
    )
    # Heavy calls: at most a quarter of the threads, and no more than the cores they compete for.
    if max_heavy is None:
        max_heavy = max(1, min(max_workers // 4, os.cpu_count() or 1))
    pb_grpc.add_LikenessServicer_to_server(
        LikenessServicer(runtime, max_watchers=max(1, max_workers // 2), max_heavy=max_heavy), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    creds = server_credentials(auth)
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises instead of returning 0 on a failed bind
        raise InvalidInput(f"could not listen on {address} ({exc}); is the port in use or the address wrong?") from None
    if port == 0 and not address.endswith(":0"):
        raise InvalidInput(f"could not bind {address}; is the port in use?")
    return server, port, health_servicer


def mark_serving_when_ready(runtime: Runtime, health_servicer: health.HealthServicer) -> threading.Thread:
    """Flip health to SERVING once the models are loaded (NOT_SERVING until then)."""
    def wait() -> None:
        runtime.ready.wait()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    t = threading.Thread(target=wait, name="likeness-health", daemon=True)
    t.start()
    return t


def serve(address: str, runtime: Runtime, *, auth: AuthConfig | None = None,
          on_bound: Any = None) -> None:
    """Run a server until SIGINT/SIGTERM; running builds stop after their unit and resume next start."""
    server, port, health_servicer = create_server(address, runtime, auth=auth)
    server.start()
    resumed = runtime.start()
    mark_serving_when_ready(runtime, health_servicer)
    if on_bound is not None:
        on_bound(port, resumed)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    runtime.stop()
