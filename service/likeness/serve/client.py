"""Python client for the Likeness gRPC service.

    from likeness.serve.client import LikenessClient
    with LikenessClient("127.0.0.1:50051", token="...") as c:
        build = c.start_build(spec=load_spec("examples/emily.toml"), options={"k": 25})
        for ev in c.watch_build(build.id):       # reconnects by itself, misses nothing
            print(ev.number, ev.stage, ev.done, ev.total, ev.message)
        open("3m1ly.safetensors", "wb").write(c.get_embedding(build_id=build.id).data)

Calls return protobuf messages (likeness.serve.pb.likeness_pb2); gRPC errors are
``grpc.RpcError`` with the server's status code and a message saying what to fix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc

from likeness.serve.auth import TokenCallCredentials
from likeness.serve.pb import likeness_pb2 as pb
from likeness.serve.pb import likeness_pb2_grpc as pb_grpc
from likeness.spec import CharacterSpec

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
# Heavy calls a busy server refuses with RESOURCE_EXHAUSTED and a grpc-retry-pushback-ms trailer
# (docs/service.md): gRPC's own retry policy (gRFC A6) waits what the server says and tries again,
# up to 5 attempts in all (gRPC's cap). Other RESOURCE_EXHAUSTED errors carry pushback -1: no retry.
HEAVY_RETRY_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": pb.DESCRIPTOR.services_by_name["Likeness"].full_name, "method": m}
             for m in ("ScoreConsistency", "Curate", "Generate")],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "10s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]},
}]})
_FORMATS = {"a1111-pt": pb.A1111_PT, "safetensors": pb.SAFETENSORS, "diffusers": pb.DIFFUSERS}
TERMINAL_STATES = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def spec_message(spec: CharacterSpec) -> pb.CharacterSpec:
    from likeness.serve.servicer import spec_to_pb

    return spec_to_pb(spec.to_dict())


def options_message(options: dict[str, Any] | None) -> pb.BuildOptions:
    from likeness.serve.servicer import options_to_pb

    return options_to_pb(dict(options or {}))


def image_inputs(images: Sequence[bytes | str | Path | tuple[str, bytes]]) -> list[pb.ImageInput]:
    """Bytes, file paths or (name, bytes) pairs -> ImageInput messages."""
    out = []
    for i, item in enumerate(images):
        if isinstance(item, tuple):
            out.append(pb.ImageInput(name=item[0], data=item[1]))
        elif isinstance(item, (str, Path)):
            out.append(pb.ImageInput(name=Path(item).name, data=Path(item).read_bytes()))
        else:
            out.append(pb.ImageInput(name=str(i), data=item))
    return out


class LikenessClient:
    """A channel plus typed helpers for every RPC."""

    def __init__(self, address: str, *, token: str = "", tls_ca: str = "", timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE, retry_heavy: bool = True) -> None:
        """``retry_heavy``: retry heavy calls a busy server refused, after the wait it asks for (False: raise at once)."""
        options: list[tuple[str, Any]] = [("grpc.max_send_message_length", max_message_bytes),
                                          ("grpc.max_receive_message_length", max_message_bytes)]
        if retry_heavy:
            # The retry buffer holds the request for another attempt; past its size (256 KiB by default, less
            # than a few photos) gRPC commits the call and cannot retry it.
            options += [("grpc.enable_retries", 1), ("grpc.service_config", HEAVY_RETRY_CONFIG),
                        ("grpc.per_rpc_retry_buffer_size", max_message_bytes)]
        else:
            options.append(("grpc.enable_retries", 0))
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(TokenCallCredentials(token)))
            self.channel = grpc.secure_channel(address, creds, options=options)
            self._metadata: tuple[tuple[str, str], ...] = ()
        else:
            self.channel = grpc.insecure_channel(address, options=options)
            # Call credentials need TLS in grpc; on plaintext the token travels as metadata.
            self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.LikenessStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "LikenessClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, name: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(self.stub, name)(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health says SERVING (models loaded)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:.0f}s")
            time.sleep(0.2)

    # characters
    def create_character(self, spec: CharacterSpec) -> pb.Character:
        return self._call("CreateCharacter", pb.CreateCharacterRequest(spec=spec_message(spec)))

    def get_character(self, name: str) -> pb.Character:
        return self._call("GetCharacter", pb.GetCharacterRequest(name=name))

    def list_characters(self) -> list[pb.Character]:
        return list(self._call("ListCharacters", pb.ListCharactersRequest()).characters)

    def delete_character(self, name: str) -> bool:
        return self._call("DeleteCharacter", pb.DeleteCharacterRequest(name=name)).deleted

    # builds
    def start_build(self, *, character: str = "", spec: CharacterSpec | None = None,
                    options: dict[str, Any] | None = None) -> pb.Build:
        req = pb.StartBuildRequest(options=options_message(options))
        if character:
            req.character = character
        elif spec is not None:
            req.spec.CopyFrom(spec_message(spec))
        return self._call("StartBuild", req)

    def get_build(self, build_id: str) -> pb.Build:
        return self._call("GetBuild", pb.GetBuildRequest(id=build_id))

    def list_builds(self, character: str = "", limit: int = 0) -> list[pb.Build]:
        return list(self._call("ListBuilds", pb.ListBuildsRequest(character=character, limit=limit)).builds)

    def cancel_build(self, build_id: str) -> pb.Build:
        return self._call("CancelBuild", pb.CancelBuildRequest(id=build_id))

    def watch_build(self, build_id: str, after_event: int = 0, *, reconnect: bool = True,
                    max_retries: int = 30, timeout: float | None = None) -> Iterator[pb.BuildEvent]:
        """Events until the build ends; on a dropped stream it reconnects after the last number seen.

        ``timeout``: seconds for the whole watch (DEADLINE_EXCEEDED after it); None = until the end.
        """
        last, retries = after_event, 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                stream = self.stub.WatchBuild(pb.WatchBuildRequest(id=build_id, after_event=last),
                                              metadata=self._metadata, timeout=left)
                for ev in stream:
                    last, retries = ev.number, 0
                    yield ev
                return
            except grpc.RpcError as exc:
                if not reconnect or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL) \
                        or retries >= max_retries:
                    raise
                retries += 1
                time.sleep(min(0.2 * 2 ** retries, 5.0))

    def wait_build(self, build_id: str, timeout: float | None = None) -> pb.Build:
        """Follow events until the build is final; returns the final Build."""
        try:
            for _ in self.watch_build(build_id, timeout=timeout):
                pass
        except grpc.RpcError as exc:
            # The stream's own deadline: fires even when the build sends no event at all.
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"build {build_id} not finished after {timeout}s") from None
            raise
        return self.get_build(build_id)

    # images
    def generate(self, prompt: str, *, characters: Sequence[str] = (), negative_prompt: str = "",
                 sampler: str = "", steps: int = 0, cfg_scale: float = 0.0, width: int = 0, height: int = 0,
                 seeds: Sequence[int] = (), count: int = 0, profile: str = "",
                 timeout: float | None = None) -> Iterator[pb.GeneratedImage]:
        req = pb.GenerateRequest(characters=list(characters), prompt=prompt, negative_prompt=negative_prompt,
                                 sampler=sampler, steps=steps, cfg_scale=cfg_scale, width=width, height=height,
                                 seeds=list(seeds), count=count, profile=profile)
        return self.stub.Generate(req, timeout=timeout or self.timeout, metadata=self._metadata)

    def score_consistency(self, images: Sequence[Any], *, character: str = "",
                          reference: Sequence[Any] = (), timeout: float | None = None) -> pb.ScoreConsistencyResponse:
        req = pb.ScoreConsistencyRequest(images=image_inputs(images))
        if character:
            req.character = character
        else:
            req.reference_images.images.extend(image_inputs(reference))
        return self._call("ScoreConsistency", req, timeout)

    def curate(self, images: Sequence[Any] = (), *, gallery: str = "", character: str = "",
               k: int = 0, timeout: float | None = None) -> pb.CurateResponse:
        """Decisions for images or a server folder; the server stops work when ``timeout`` passes."""
        return self._call("Curate", pb.CurateRequest(images=image_inputs(images), gallery=gallery,
                                                     character=character, k=k), timeout)

    # artifacts
    def get_embedding(self, *, character: str = "", build_id: str = "", format: str = "safetensors") -> pb.EmbeddingFile:
        req = pb.GetEmbeddingRequest(format=_FORMATS[format])
        if character:
            req.character = character
        else:
            req.build_id = build_id
        return self._call("GetEmbedding", req)

    def get_report(self, build_id: str) -> pb.Report:
        return self._call("GetReport", pb.GetReportRequest(build_id=build_id))
