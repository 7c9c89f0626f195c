# syntax=docker/dockerfile:1
# orcd GPU worker image.
#
#   docker build -t orcd:0.1.0 --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -v "$HOME/models:/models" orcd:0.1.0 \
#     --model smollm2-135m-instruct.gguf
#
# Two stages: PyCUDA compiles against the CUDA headers and libcuda stub of the -devel image; the
# finished virtual environment is copied into the much smaller -runtime image.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Distribution packages float with the base image's release; the base tag is what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv g++ \
 && rm -rf /var/lib/apt/lists/*

# The venv lives at the same path in both stages, so its scripts' shebangs stay valid.
ENV VIRTUAL_ENV=/opt/orcd/venv
RUN python3 -m venv "$VIRTUAL_ENV"
# PyCUDA's build finds the toolkit in CUDA_ROOT and links against the driver stub (no GPU here).
ENV PATH="$VIRTUAL_ENV/bin:$PATH" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_ROOT=/usr/local/cuda \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs

WORKDIR /src
# Only what the package build reads; .dockerignore keeps the rest of the tree out of the context.
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY orcd_grpc/ orcd_grpc/
# The kernel sources: the package build copies them into the installed package (orcd_grpc/cuda/).
COPY cuda/ cuda/
# The local package with its extra; its dependency ranges are pyproject.toml's business.
# hadolint ignore=DL3013
RUN pip install ".[cuda]"

# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG CUDA_VERSION
ARG DEBIAN_FRONTEND=noninteractive
# Kernels are compiled with nvcc on first use, for the GPU the container actually gets (its
# architecture is unknown at build time), so the runtime needs nvcc, the CUDA headers and a host
# compiler. The cuda-* package names carry the toolkit's major-minor version, e.g. 13-0.
# hadolint ignore=DL3008
RUN CUDA_PKG="$(echo "${CUDA_VERSION}" | cut -d. -f1-2 | tr . -)" \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 "cuda-nvcc-${CUDA_PKG}" "cuda-cudart-dev-${CUDA_PKG}" g++ \
 && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid/gid so volume permissions can be planned for (Kubernetes fsGroup too).
RUN groupadd --system --gid 10001 orcd \
 && useradd --system --uid 10001 --gid orcd --home-dir /home/orcd --create-home orcd \
 && mkdir -p /models /var/cache/orcd/kernels \
 && chown orcd:orcd /models /var/cache/orcd/kernels

COPY --from=build /opt/orcd /opt/orcd

ARG GIT_COMMIT=""
ARG BUILD_DATE=""
# ORCD_MODEL_DIR: the model cache is the /models volume, so known model names are found there.
# ORCD_KERNEL_CACHE: compiled kernels; mount a volume there to skip recompiling at each start.
# NUMBA_CACHE_DIR: numba's compiled code (the SentencePiece tokenizer's merge loop, the CPU
# backend's kernels) beside them; the installed package's own directory is not writable here.
# ORCD_GIT_COMMIT/ORCD_BUILD_DATE: the build context has no .git, so they come from build args.
ENV PATH="/opt/orcd/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    ORCD_MODEL_DIR=/models \
    ORCD_KERNEL_CACHE=/var/cache/orcd/kernels \
    NUMBA_CACHE_DIR=/var/cache/orcd/kernels/numba \
    ORCD_GIT_COMMIT=${GIT_COMMIT} \
    ORCD_BUILD_DATE=${BUILD_DATE}

# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# `--model NAME.gguf` is a path relative to the working directory: make that the model volume.
WORKDIR /models
VOLUME ["/models"]
# 50051: gRPC (orcd.v1.Worker, grpc.health.v1.Health, reflection). 9400: Prometheus metrics.
EXPOSE 50051 9400

# Docker's own health check asks the worker's HTTP /healthz on the metrics port, which mirrors the
# standard gRPC health status: SERVING only once a model is loaded (the start period covers a model
# load). The metrics port speaks HTTPS when the worker has a TLS certificate (issue #15), HTTP
# otherwise: the probe tries both. It does not verify the certificate: it asks its own process on
# loopback, and /healthz answers only SERVING or NOT_SERVING, with no token needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import ssl, sys, urllib.request as u\nc = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\ndef ok(url, **k):\n    try: return u.urlopen(url, timeout=2, **k).status == 200\n    except Exception: return False\nsys.exit(0 if ok('https://127.0.0.1:9400/healthz', context=c) or ok('http://127.0.0.1:9400/healthz') else 1)"]

# Arguments after the image name are appended, e.g. `--model NAME.gguf` (a file in /models).
# Without --model the worker serves smollm2-135m-instruct from /models (fetched there if absent).
ENTRYPOINT ["orcd", "serve", "--host", "0.0.0.0", "--port", "50051", "--model-dir", "/models", "--metrics-port", "9400"]
CMD []
