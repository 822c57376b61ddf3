# Likeness gRPC service on an NVIDIA GPU.
#
#   docker build -t likeness .
#   docker run --gpus all -p 50051:50051 \
#     -v "$PWD/models:/app/models" -v likeness-data:/data likeness
#
# Two stages: the builder installs everything into /opt/venv (wheels only:
# insightface 2.1 is a pure-Python wheel, so no compiler is needed); the runtime
# image copies only that venv onto NVIDIA's CUDA 13 base image. torch==2.14.1 from
# PyPI is the CUDA 13.0 build (driver >= 580) and brings the CUDA 13 runtime,
# cuBLAS and cuDNN 9 as pip wheels (nvidia/cu13, nvidia/cudnn in the venv);
# onnxruntime-gpu 1.31.1 is a CUDA 13 build too and loads those same libraries
# (LD_LIBRARY_PATH below), so the image carries one CUDA runtime, not two. The
# base image adds the driver checks (NVIDIA_REQUIRE_CUDA) and the container
# toolkit's settings. Both stages are Ubuntu 24.04, so the venv's python3.12
# symlink resolves the same in both. See docs/docker.md.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# --------------------------------------------------------------------- builder
FROM ubuntu:24.04 AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: with an empty package stub, a source
# change does not reinstall torch and friends; only pyproject.toml does.
COPY pyproject.toml README.md ./
# Every version is pinned in pyproject.toml (DL3013 cannot see that).
# onnxruntime/onnxruntime-gpu install the same module name; the base requirements
# (and insightface) pull the CPU build, so the GPU build (the pin of pyproject's
# cuda extra) is put back on top of the removed CPU one. Likewise insightface pulls
# opencv-python, whose cv2 needs libGL (absent here) and shadows the headless
# build: both are removed and the pinned headless one reinstalled. faiss stays the
# CPU build: exact search over a gallery's 400 x 512 embeddings takes about a
# millisecond there (0.75 ms Gram matrix, 11 ms range search on 2 loaded cores).
# hadolint ignore=DL3013
RUN mkdir -p service/likeness \
    && touch service/likeness/__init__.py \
    && pip install --no-cache-dir ".[cuda]" \
    && pip uninstall -y onnxruntime opencv-python opencv-python-headless \
    && pip install --no-cache-dir --no-deps --force-reinstall onnxruntime-gpu==1.31.1 opencv-python-headless==5.0.0.93

# Then the real package (no dependency resolution: they are all there).
# The check fails the build, rather than the service at run time, when a data file
# of service/likeness/ (JSON tables, schemas) did not make it into the wheel.
COPY service/ service/
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -I -c "import pathlib, likeness; src = pathlib.Path('/src/service/likeness'); dst = pathlib.Path(likeness.__file__).parent; missing = [str(p.relative_to(src)) for p in src.rglob('*') if p.is_file() and p.suffix not in ('.py', '.pyc') and '__pycache__' not in p.parts and not (dst / p.relative_to(src)).exists()]; assert not missing, f'data files missing from the installed package: {missing}; declare them in pyproject.toml [tool.setuptools.package-data]'"

# The tiny random models behind the cpu-tiny profiles (built offline, a few MB):
# `likeness profiles` and smoke tests work in the image without any weights mounted.
COPY scripts/build_tiny_models.py scripts/
RUN HF_HUB_OFFLINE=1 python scripts/build_tiny_models.py --out /opt/models/tiny

# --------------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive

# python3 for the venv; libgomp1 for faiss/onnxruntime; libglib2.0-0 for OpenCV (headless).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libglib2.0-0 \
        libgomp1 \
        python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 likeness \
    && useradd --system --uid 10001 --gid likeness --home-dir /app --shell /usr/sbin/nologin likeness \
    && mkdir -p /app/models /data \
    && chown likeness:likeness /app /app/models /data

COPY --from=builder /opt/venv /opt/venv
COPY --chown=likeness:likeness models/*.toml /app/models/
COPY --from=builder --chown=likeness:likeness /opt/models/tiny /app/models/tiny

# Offline at run time: weights come from the models volume, never from a hub.
# (DL3064 flags the "TOKEN" in TOKENIZERS_PARALLELISM: it is not a secret.)
# LD_LIBRARY_PATH: the CUDA 13 runtime, cuBLAS and cuDNN that torch's wheels installed,
# where onnxruntime-gpu's CUDA provider finds them (the base image has no cuDNN).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.12/site-packages/nvidia/cudnn/lib \
    PYTHONUNBUFFERED=1 \
    LIKENESS_MODELS_DIR=/app/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    LIKENESS_HEALTH_ADDR=127.0.0.1:50051

WORKDIR /app
# Numeric, so Kubernetes runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# Weights (profiles + A1111-style folders) and builds/SQLite live outside the image.
VOLUME ["/app/models", "/data"]
EXPOSE 50051

# grpc.health.v1: SERVING only once the models are loaded (the service reports
# NOT_SERVING while loading or when a model is missing).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel(os.environ.get('LIKENESS_HEALTH_ADDR', '127.0.0.1:50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["likeness", "serve", "--listen", "0.0.0.0:50051", "--data", "/data"]
CMD []
