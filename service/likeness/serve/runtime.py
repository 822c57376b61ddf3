"""The service's data plane: characters, builds, scoring, curation, generation, artifacts.

Plain Python over the store, the worker pool and the stage modules; the gRPC
servicer (service/likeness/serve/servicer.py) only converts messages and calls these methods,
and the CLI calls them directly when embedded. Never imports grpc.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from likeness import layout
from likeness.build.options import BuildOptions, build_options, effective_spec
from likeness.build.runner import run_build, start_build
from likeness.config import SEED_MAX, check_seed, field_bounds
from likeness.errors import Cancelled, FailedPrecondition, InvalidInput, NotFound
from likeness.files import check_name, safe_join
from likeness.backends.cache import ModelCache
from likeness.preflight import check_build_request
from likeness.profiles import resolve_profile
from likeness.progress import CancelToken
from likeness.spec import CharacterSpec, spec_from_dict
from likeness.build.store import BuildRow, CharacterRow, EventRow, Store
from likeness.build.worker import WorkerPool, loader_device

log = logging.getLogger(__name__)

EMBEDDING_FORMATS = ("a1111-pt", "safetensors", "diffusers")


@dataclass(frozen=True)
class Limits:
    # gRPC max send/receive message size: 64 MiB carries ~100 full-size PNGs.
    max_message_bytes: int = 64 * 1024 * 1024
    # Images in one ScoreConsistency/Curate request (and reference images).
    max_images: int = 512
    # Bytes of one image: a 50 MP PNG fits; anything bigger is not a photo.
    max_image_bytes: int = 32 * 1024 * 1024
    # Characters of a prompt: A1111 prompts of several 75-token chunks fit easily.
    max_prompt_chars: int = 4000
    # Images one Generate call may make (each occupies the device).
    max_generate_images: int = 64
    # Images of one build's gallery (zooms x angles x per cell): 50x the hand workflow's 400.
    max_gallery_images: int = 20_000
    # Entries of a spec list (traits, zooms, angles, ...) and characters of one spec text field.
    max_spec_items: int = 64
    max_spec_text: int = 4000
    # Images Curate analyses per batch: the call's deadline is checked between batches.
    curate_batch_size: int = 8


# ------------------------------------------------------- typed results
# What the data plane returns; the servicer converts each to its message, the
# CLI prints it. Plain frozen dataclasses: no dicts whose keys drift apart.

@dataclass(frozen=True)
class EmbeddingBlob:
    filename: str
    data: bytes
    format: str
    token: str
    build_id: str


@dataclass(frozen=True)
class ReportFiles:
    build_id: str
    json: str
    html: bytes


@dataclass(frozen=True)
class ImageConsistency:
    index: int
    name: str
    face_found: bool
    # Cosine of the image's main face to the reference centroid (0.0 without a face).
    identity: float
    # identity >= the face pack's calibrated same-person threshold.
    same_identity: bool


@dataclass(frozen=True)
class ConsistencyResult:
    images: tuple[ImageConsistency, ...]
    set_scores: dict[str, float]
    # The same-person threshold used: the face pack's calibration (curate and `likeness score` use the same).
    threshold: float
    # False when the face pack has no calibration and the CPU pack's defaults were used.
    calibrated: bool


@dataclass(frozen=True)
class CurateDecision:
    index: int
    name: str
    kept: bool
    # (reason code, reason in words)
    reasons: tuple[str, str]
    scores: dict[str, float]


@dataclass(frozen=True)
class CurateResult:
    decisions: tuple[CurateDecision, ...]
    set_scores: dict[str, float]
    # curation.json's warnings (not one consistent character) and summary.short_of_k's message.
    warnings: tuple[str, ...] = ()
    k: int = 0
    short_of_k: str = ""


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    seed: int
    png: bytes
    infotext: str


class CallRecord:
    """One long call (Generate, Curate): how many units it finished and how it ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.units = 0
        # "running", then "ok", "cancelled" (its token fired), "closed" (the stream was dropped) or "error".
        self.outcome = "running"


class CallLog:
    """In-flight long calls and the last finished ones: lets logs and tests see that work stopped."""

    def __init__(self, keep: int = 100) -> None:
        self._cond = threading.Condition()
        self._active: set[int] = set()
        self.finished: deque[CallRecord] = deque(maxlen=keep)

    @contextmanager
    def track(self, name: str) -> Iterator[CallRecord]:
        rec = CallRecord(name)
        with self._cond:
            self._active.add(id(rec))
        try:
            yield rec
            rec.outcome = "ok"
        except Cancelled:
            rec.outcome = "cancelled"
            raise
        except GeneratorExit:
            rec.outcome = "closed"
            raise
        except BaseException:
            rec.outcome = "error"
            raise
        finally:
            with self._cond:
                self._active.discard(id(rec))
                self.finished.append(rec)
                self._cond.notify_all()
            if rec.outcome in ("cancelled", "closed"):
                log.info("%s stopped after %d unit(s): the call ended", name, rec.units)

    def active(self) -> int:
        with self._cond:
            return len(self._active)

    def wait_idle(self, timeout: float) -> bool:
        """True once no long call is running (False if ``timeout`` passed first)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._active, timeout)


class Runtime:
    """Everything the service does, over one data directory."""

    def __init__(self, data_dir: str | Path, *, devices: list[str] | None = None,
                 import_roots: Sequence[str | Path] = (), limits: Limits | None = None,
                 default_profile: str = "", start_workers: bool = True,
                 stages: dict[str, Any] | None = None, executor: Any = None) -> None:
        """``stages`` replaces stage functions by name; only unit tests of the plumbing use it.

        ``executor`` (:func:`likeness.executor.make_executor`) spreads builds' generation and
        curation shards over Ray actors; None runs them in the worker's process.
        """
        self.store = Store(data_dir)
        self.limits = limits or Limits()
        self.import_roots = [Path(p).resolve() for p in import_roots]
        self.default_profile = default_profile
        self.models = ModelCache()
        self.ready = threading.Event()
        self.pool = WorkerPool(self.store, self._run, devices)
        self._start_workers = start_workers
        self._reference_cache: dict[str, Any] = {}
        self._stages = stages
        self.executor = executor
        self.calls = CallLog()

    # ------------------------------------------------------------ lifecycle
    def start(self, *, load_models: bool = True) -> list[str]:
        """Start workers (resuming interrupted builds) and load the default models in the background."""
        resumed = self.pool.start() if self._start_workers else []
        if load_models:
            threading.Thread(target=self._load_models, name="likeness-load-models", daemon=True).start()
        else:
            self.ready.set()
        return resumed

    def device_for(self, profile: Any) -> str | None:
        """The device requests (Score, Curate, Generate) load ``profile``'s models on: the first worker's.

        Named, as each build worker names its own (``build.worker.loader_device``), so a request's
        models and a build's on the same device are one cached copy, and none lands on GPU 0 by default.
        """
        return loader_device(profile, self.pool.devices[0] if self.pool.devices else None)

    def _load_models(self) -> None:
        try:
            prof = resolve_profile(self.default_profile)
            self.models.faces(prof, self.device_for(prof))
            self.models.clip(prof, self.device_for(prof))
            self.ready.set()
        except Exception:  # noqa: BLE001 - health stays NOT_SERVING; the log says why
            log.exception("loading models failed; health stays NOT_SERVING")

    def stop(self) -> None:
        self.pool.stop()

    def _run(self, build_id: str, device: str, cancel: CancelToken) -> None:
        run_build(self.store, build_id, device=device, cancel=cancel, models=self.models, stages=self._stages,
                  executor=self.executor)

    # ----------------------------------------------------------- characters
    def check_spec(self, spec: CharacterSpec) -> CharacterSpec:
        """Bounds the spec module leaves open: list lengths, text lengths, gallery size."""
        lim = self.limits
        d = spec.to_dict()
        for key, value in d.items():
            if isinstance(value, str) and len(value) > lim.max_spec_text:
                raise InvalidInput(f"spec.{key}: {len(value)} characters is over the limit of {lim.max_spec_text}")
            if isinstance(value, (list, tuple)):
                if len(value) > lim.max_spec_items:
                    raise InvalidInput(f"spec.{key}: {len(value)} entries is over the limit of {lim.max_spec_items}")
                if any(isinstance(v, str) and len(v) > 300 for v in value):
                    raise InvalidInput(f"spec.{key}: each entry must be at most 300 characters")
        if spec.grid_size > lim.max_gallery_images:
            raise InvalidInput(
                f"the gallery would have {spec.grid_size} images (zooms x angles x per_cell); the limit is "
                f"{lim.max_gallery_images}: use fewer zooms, angles or images per cell")
        return spec

    def create_character(self, spec: CharacterSpec) -> CharacterRow:
        check_name(spec.name, "character name")
        return self.store.create_character(spec.name, self.check_spec(spec).to_dict())

    def get_character(self, name: str) -> CharacterRow:
        return self.store.get_character(check_name(name, "character name"))

    def list_characters(self) -> list[CharacterRow]:
        return self.store.list_characters()

    def delete_character(self, name: str) -> bool:
        self.get_character(name)
        return self.store.delete_character(name)

    # --------------------------------------------------------------- builds
    def check_import_folder(self, folder: str) -> Path:
        """A server-side folder must lie inside one of the configured import roots."""
        if not self.import_roots:
            raise FailedPrecondition(
                "this server imports no folders; start it with --import-root DIR to allow galleries under DIR"
            )
        p = Path(folder)
        for root in self.import_roots:
            try:
                target = safe_join(root, str(p.relative_to(root)) if p.is_absolute() else str(p))
            except (InvalidInput, ValueError):
                continue
            if target.is_dir():
                return target
        # The roots are named by their folder names only: a client has no business with server paths.
        raise InvalidInput(
            f"gallery folder {folder!r} is not a folder inside this server's import roots "
            f"({', '.join(repr(r.name) for r in self.import_roots)}); pass a folder path relative to one of them"
        )

    def start_build(self, *, character: str = "", spec: CharacterSpec | None = None,
                    options: dict[str, Any] | None = None) -> BuildRow:
        if bool(character) == (spec is not None):
            raise InvalidInput("give either a character name or an inline spec, not both or neither")
        if character:
            spec = spec_from_dict(self.get_character(character).spec)
        assert spec is not None
        opts = build_options(options)
        eff = self.check_spec(effective_spec(spec, opts))
        # The profile the build will run with (an unknown one fails now, listing the valid ones), then
        # what the CLI refuses at the door too: a CUDA profile without a GPU worker, a known token.
        prof = resolve_profile(None, eff.profile)
        check_build_request(eff, prof, has_cuda=any(d.startswith("cuda") for d in self.pool.devices))
        if opts.import_gallery:
            opts = BuildOptions(**{**opts.__dict__, "import_gallery": str(self.check_import_folder(opts.import_gallery)),
                                   "import_roots": tuple(str(r) for r in self.import_roots)})
        build_id = start_build(self.store, spec, opts, character=character)
        self.pool.wake()
        return self.store.get_build(build_id)

    def get_build(self, build_id: str) -> BuildRow:
        return self.store.get_build(check_name(build_id, "build id"))

    def list_builds(self, character: str = "", limit: int = 100) -> list[BuildRow]:
        if character:
            check_name(character, "character name")
        if not 0 <= limit <= 10_000:
            raise InvalidInput("limit must be 0 (default 100) to 10000")
        return self.store.list_builds(character, limit or 100)

    def cancel_build(self, build_id: str) -> BuildRow:
        self.get_build(build_id)
        row = self.store.request_cancel(build_id)
        self.pool.cancel(build_id)
        return row

    def watch_build(self, build_id: str, after: int = 0, active: Callable[[], bool] | None = None) -> Iterator[EventRow]:
        if after < 0:
            raise InvalidInput("after_event must be 0 or the number of the last event you saw")
        return self.store.watch(check_name(build_id, "build id"), after, active=active)

    # ------------------------------------------------------------ artifacts
    def _latest_build(self, character: str) -> BuildRow:
        row = self.get_character(character)
        if not row.latest_build_id:
            raise FailedPrecondition(f"character {character!r} has no finished build yet; start one with StartBuild")
        return self.store.get_build(row.latest_build_id)

    def _finished_build(self, build_id: str = "", character: str = "") -> BuildRow:
        row = self._latest_build(character) if character else self.get_build(build_id)
        if row.state != "succeeded":
            raise FailedPrecondition(f"build {row.id} is {row.state}, not succeeded; wait for it (WatchBuild)")
        return row

    def get_embedding(self, *, build_id: str = "", character: str = "", format: str = "safetensors") -> EmbeddingBlob:
        if format not in EMBEDDING_FORMATS:
            raise InvalidInput(f"embedding format {format!r} is not valid; use one of {EMBEDDING_FORMATS}")
        row = self._finished_build(build_id, character)
        files = row.result.get("embeddings", {})
        if format not in files:
            raise NotFound(f"build {row.id} has no {format} embedding (it has {sorted(files)})")
        path = safe_join(self.store.build_dir(row.id), files[format])
        if not path.is_file():
            raise NotFound(f"build {row.id}'s {format} embedding file is missing from the data directory; rebuild it")
        return EmbeddingBlob(filename=path.name, data=path.read_bytes(), format=format,
                             token=row.result.get("token", ""), build_id=row.id)

    def get_report(self, build_id: str) -> ReportFiles:
        """The build's report; a cancelled or failed build gets one made from what it left.

        Such a report says which stages did not run (issue: a build cancelled
        after curation still gets a report). A running or queued build has none yet.
        """
        row = self.get_build(build_id)
        if row.state in ("queued", "running"):
            raise FailedPrecondition(f"build {row.id} is {row.state}; its report is written when it ends (WatchBuild)")
        build_dir = self.store.build_dir(row.id)
        root = build_dir / layout.REPORT_DIR
        js, html = root / layout.REPORT_JSON, root / layout.REPORT_HTML
        if not js.is_file():
            if row.state == "succeeded":
                raise NotFound(f"build {row.id} has no report.json; run `likeness report {row.id}` to write it")
            from likeness.build.runner import prepare_build_dir
            from likeness.report.document import write_report

            # A build cancelled while queued never got a folder: its report says no stage ran.
            prepare_build_dir(self.store, row)
            write_report(build_dir, {"state": row.state, "error": row.error})
        return ReportFiles(build_id=row.id, json=js.read_text(encoding="utf-8"),
                           html=html.read_bytes() if html.is_file() else b"")

    # -------------------------------------------------------------- scoring
    def _check_images(self, images: Sequence[tuple[str, bytes]], what: str = "images") -> list[Any]:
        from likeness.images import load_image_bytes

        if not images:
            raise InvalidInput(f"{what}: send at least one image")
        if len(images) > self.limits.max_images:
            raise InvalidInput(f"{what}: {len(images)} images is over the limit of {self.limits.max_images} per request; split it")
        out = []
        for i, (name, data) in enumerate(images):
            label = f"{what}[{i}]" + (f" ({name})" if name else "")
            if len(data) > self.limits.max_image_bytes:
                raise InvalidInput(f"{label}: {len(data)} bytes is over the {self.limits.max_image_bytes} byte limit")
            img, _ = load_image_bytes(data, label)
            out.append(img)
        return out

    def _embed_main_faces(self, profile: Any, pil_images: Sequence[Any]) -> list[Any]:
        from likeness.identity import main_embeddings

        return main_embeddings(self.models.faces(profile, self.device_for(profile)), pil_images)

    def _reference_centroid(self, profile: Any, character: str = "",
                            reference: Sequence[tuple[str, bytes]] = ()) -> Any:
        import numpy as np

        from likeness import scores
        from likeness.images import list_images, load_image

        if character:
            row = self._finished_build(character=character)
            key = f"{row.id}:{profile.name}"
            if key in self._reference_cache:
                return self._reference_cache[key]
            curated = self.store.build_dir(row.id) / layout.CURATED_DIR
            pil = [load_image(p)[0] for p in list_images(curated)] if curated.is_dir() else []
        else:
            key = ""
            pil = self._check_images(reference, "reference_images")
        embs = [e for e in self._embed_main_faces(profile, pil) if e is not None]
        if not embs:
            raise InvalidInput("no face found in the reference images; send photos where the face is visible")
        centroid = scores.identity_centroid(np.stack(embs))
        if key:
            self._reference_cache[key] = centroid
        return centroid

    def score_consistency(self, images: Sequence[tuple[str, bytes]], *, character: str = "",
                          reference: Sequence[tuple[str, bytes]] = (), profile: str = "") -> ConsistencyResult:
        """Identity similarity of each image to a character (or reference images), plus set scores.

        The same-person threshold and the identity scale come from the face pack's
        calibration (:func:`likeness.curate.calibration.calibration_for`), as in
        curation and ``likeness score``: one rule, whichever door a client uses.
        """
        from likeness import scores
        from likeness.curate.calibration import calibration_for

        if bool(character) == bool(reference):
            raise InvalidInput("give either a character or reference_images, not both or neither")
        pil = self._check_images(images)
        prof = resolve_profile(profile or self.default_profile)
        centroid = self._reference_centroid(prof, character, reference)
        embs = self._embed_main_faces(prof, pil)
        cal = calibration_for(getattr(self.models.faces(prof, self.device_for(prof)), "recognition_sha256", None))
        threshold = float(cal.threshold)
        per_image = []
        for i, e in enumerate(embs):
            ident = None if e is None else float(scores.identity_similarities(e[None], centroid)[0])
            per_image.append(ImageConsistency(index=i, name=images[i][0], face_found=e is not None,
                                              identity=ident if ident is not None else 0.0,
                                              same_identity=ident is not None and scores.same_person(ident, threshold)))
        s = scores.set_scores(embs, scale=cal.scale)
        set_dict = {k: float(v) for k, v in s.to_dict().items() if isinstance(v, (int, float)) and v is not None}
        found = [p.identity for p in per_image if p.face_found]
        set_dict["identity_mean_to_reference"] = float(sum(found) / len(found)) if found else 0.0
        return ConsistencyResult(images=tuple(per_image), set_scores=set_dict, threshold=threshold,
                                 calibrated=bool(cal.calibrated))

    # ----------------------------------------------------------- curation
    def curate(self, *, images: Sequence[tuple[str, bytes]] = (), gallery: str = "", character: str = "",
               k: int = 0, cancel: CancelToken | None = None) -> CurateResult:
        """Decisions, reasons and scores for sent images or a server-side folder."""
        import tempfile

        from likeness.curate.decide import CurateConfig, curate
        from likeness.files import atomic_write_bytes

        if bool(images) == bool(gallery):
            raise InvalidInput("send images or name a server-side gallery folder, not both or neither")
        lo, hi = field_bounds(CurateConfig, "k")
        if k < 0 or (k and not lo <= k <= hi):
            raise InvalidInput(f"k: {k} is out of range; use 0 (curation's default, {CurateConfig.k}) or {lo} to {hi}")
        spec = self.character_spec(character) if character else None
        prof = resolve_profile((spec.profile if spec else "") or self.default_profile)
        skipped: list[dict[str, str]] = []
        with self.calls.track("curate"), tempfile.TemporaryDirectory(dir=self.store.data_dir) as tmp:
            if images:
                self._check_images(images)
                src = Path(tmp) / "gallery"
                names = {}
                for i, (_, data) in enumerate(images):
                    atomic_write_bytes(src / f"img{i:05d}.png", data)
                    names[f"img{i:05d}"] = i
            else:
                # One loader, one rule: the folder is read by the build's importer (links
                # that stay inside the import roots are followed, others are skipped with the
                # reason), so Curate decides exactly what a build importing the folder would.
                from likeness.generate.importer import import_gallery

                src = Path(tmp) / "gallery"
                folder = self.check_import_folder(gallery)
                imported = import_gallery(folder, src, spec, cancel=cancel, roots=self.import_roots)
                skipped = imported.skipped
                if not imported.imported:
                    raise InvalidInput(
                        f"gallery folder {gallery!r}: none of its {len(skipped)} image files can be used"
                        + (f" (first: {skipped[0]['reason']})" if skipped else " (it holds no images)"))
                names = json.loads((src / "import.json").read_text(encoding="utf-8"))["sources"]
            cfg = CurateConfig(k=k or CurateConfig.k, batch_size=self.limits.curate_batch_size)
            res = curate(src, spec, Path(tmp) / "out", cfg, faces=self.models.faces(prof, self.device_for(prof)),
                         clip=self.models.clip(prof, self.device_for(prof)), cancel=cancel)
        decisions = []
        for j, d in enumerate(res.images):
            if images:
                i = names.get(d.id, j)
                name = images[i][0] or d.id
            else:
                i, name = j, names.get(d.id, d.file)  # the file as the client named it, relative to the folder
            decisions.append(CurateDecision(index=i, name=name, kept=d.decision == "kept",
                                            reasons=(d.reason_code, d.reason),
                                            scores={k2: float(v) for k2, v in d.scores.items()
                                                    if isinstance(v, (int, float)) and v is not None}))
        for s in skipped:  # files the importer could not use: decided, with the importer's reason
            decisions.append(CurateDecision(index=len(decisions), name=s["file"], kept=False,
                                            reasons=("undecodable", s["reason"]), scores={}))
        selected = res.set_scores.get("selected", {})
        short = res.summary.get("short_of_k") or {}
        return CurateResult(decisions=tuple(decisions),
                            set_scores={k2: float(v) for k2, v in selected.items()
                                        if isinstance(v, (int, float)) and v is not None},
                            warnings=tuple(res.warnings), k=cfg.k, short_of_k=short.get("message", ""))

    # ---------------------------------------------------------- generation
    def generate(self, *, characters: Sequence[str] = (), prompt: str, negative_prompt: str = "",
                 sampler: str = "", steps: int = 0, cfg_scale: float = 0.0, width: int = 0, height: int = 0,
                 seeds: Sequence[int] = (), count: int = 0, profile: str = "",
                 cancel: CancelToken | None = None) -> Iterator[GeneratedImage]:
        """Images for an A1111 prompt with trained tokens, one per seed, yielded as they are made.

        Everything is validated here, before the first image (a bad request fails at once,
        not when the stream is first read); the images come from the returned iterator.
        """
        import random

        from likeness.config import from_dict
        from likeness.spec import SamplingConfig

        if not prompt.strip():
            raise InvalidInput("prompt: must not be empty")
        self.check_prompt(prompt)
        self.check_prompt(negative_prompt, "negative_prompt")
        if len(characters) > 16:
            raise InvalidInput("at most 16 characters per prompt")
        for c in characters:
            check_name(c, "character name")
        if seeds and count and count != len(seeds):
            raise InvalidInput(f"count {count} differs from the {len(seeds)} seeds given; give seeds or count")
        self.check_count(len(seeds) or count)  # before drawing seeds: a huge count must not allocate
        for s in seeds:
            check_seed(s, "seeds", random_ok=False)
        seeds = list(seeds) or [random.SystemRandom().randrange(0, SEED_MAX) for _ in range(count)]
        builds = [self._finished_build(character=c) for c in dict.fromkeys(characters)]
        embeddings = [self._served_embedding(b) for b in builds]  # a bad file fails before the stream
        prof_name = profile or next((b.spec.get("profile", "") for b in builds if b.spec.get("profile")), "")
        prof = resolve_profile(prof_name or self.default_profile)
        sampling = from_dict(SamplingConfig, {k: v for k, v in {
            "sampler": sampler or "DPM++ 2M Karras", "steps": steps or 30, "cfg_scale": cfg_scale or 7.0,
            "width": width or (512 if prof.family == "sd15" else 1024),
            "height": height or (512 if prof.family == "sd15" else 1024)}.items()}, "generate")
        spec_check = {"name": "x", "token": "xx", "sampling": {k: getattr(sampling, k) for k in
                                                               ("sampler", "steps", "cfg_scale", "width", "height")}}
        spec_from_dict(spec_check, where="request")
        return self._generate(embeddings, prof, sampling, prompt, negative_prompt, seeds, cancel)

    def _served_embedding(self, b: BuildRow) -> tuple[Any, str]:
        """The trained embedding of a finished build, read from this server's data directory, and
        A1111's short hash of its file (for the images' ``TI hashes``).

        The file is the server's, not the caller's: one that is missing or unreadable is
        FAILED_PRECONDITION (rebuild the character), never INVALID_ARGUMENT, and the message
        names it relative to the build folder.
        """
        from likeness.embeddings import load_embedding
        from likeness.generate.infotext import ti_hash

        rel = b.result.get("embeddings", {}).get("safetensors", "")
        if not rel:
            raise FailedPrecondition(f"build {b.id} of {b.character!r} exported no embedding; rebuild the character")
        build_dir = Path(self.store.build_dir(b.id))
        try:
            path = safe_join(build_dir, rel)
            return load_embedding(path, token=b.result["token"]), ti_hash(path)
        except (InvalidInput, NotFound, OSError) as exc:
            why = str(exc).replace(str(build_dir.resolve()) + "/", "").replace(str(build_dir) + "/", "")
            raise FailedPrecondition(
                f"build {b.id} of {b.character!r}: its embedding file {rel} on the server cannot be used ({why}); "
                "rebuild the character (StartBuild) or restore the file"
            ) from None

    def _generate(self, embeddings: list[tuple[Any, str]], prof: Any, sampling: Any, prompt: str, negative_prompt: str,
                  seeds: list[int], cancel: CancelToken | None) -> Iterator[GeneratedImage]:
        from likeness.backends.diffusion import model_hash, model_name, set_sampler
        from likeness.embeddings import load_into_pipeline
        from likeness.generate.gallery import PromptCache, infotext_for, render_images
        from likeness.generate.plan import PlannedImage

        lock = self.models.get("pipe-lock", prof.name, threading.Lock)
        with self.calls.track("generate") as rec, lock:
            pipe = self.models.pipeline(prof, self.device_for(prof))
            set_sampler(pipe, sampling.sampler)
            for emb, _ in embeddings:
                load_into_pipeline(pipe, emb)
            ti_hashes = {emb.token: short for emb, short in embeddings}
            model, mhash = model_name(prof), model_hash(prof)
            cache = PromptCache()  # one prompt: encoded once, not once per image
            for i, seed in enumerate(seeds):
                if cancel is not None:
                    cancel.check()
                item = PlannedImage(id=f"g{i}", zoom_index=-1, angle_index=-1, index_in_cell=i, zoom="", angle="",
                                    prompt=prompt, negative_prompt=negative_prompt, seed=int(seed))
                (r,) = render_images(pipe, [item], sampling, model=model, model_hash=mhash, cache=cache, cancel=cancel,
                                    ti_hashes=ti_hashes)
                rec.units += 1
                yield GeneratedImage(index=i, seed=int(seed), png=r.png,
                                     infotext=infotext_for(item, sampling, model, mhash, ti_hashes))

    def character_spec(self, name: str) -> CharacterSpec:
        return spec_from_dict(self.get_character(name).spec)

    def effective(self, spec: CharacterSpec, options: dict[str, Any] | None) -> CharacterSpec:
        return effective_spec(spec, build_options(options))

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        from likeness.prompts import parse_prompt_attention

        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidInput(f"{what}: {len(prompt)} characters is over the limit of {self.limits.max_prompt_chars}; shorten it")
        try:
            parse_prompt_attention(prompt)  # weights that overflow: refused here, not an all-black image
        except InvalidInput as exc:
            raise InvalidInput(str(exc).replace("prompt:", f"{what}:", 1)) from None
        return prompt

    def check_count(self, n: int) -> int:
        if n < 1:
            raise InvalidInput("ask for at least one image: give seeds or count >= 1")
        if n > self.limits.max_generate_images:
            raise InvalidInput(
                f"asked for {n} images; one Generate call makes at most {self.limits.max_generate_images}; split the request"
            )
        return n
