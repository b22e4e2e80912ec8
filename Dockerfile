# syntax=docker/dockerfile:1
#
# gpt-oss server image, two variants from one file (see deploy/README.md):
#   GPU (default): docker build -t gptoss-server:0.1.0 .
#   CPU:           docker build --build-arg VARIANT=cpu -t gptoss-server:0.1.0-cpu .
#
# The model is never baked in and never downloaded: mount a checkpoint folder (e.g. at
# /models) and point GPTOSS_MODEL at it. Every server flag is also an environment variable
# (GPTOSS_ + the flag in upper snake case); arguments after the image name are flags too.

ARG VARIANT=gpu
ARG UBUNTU_IMAGE=ubuntu:24.04
# PyPI's torch wheels for Linux carry their own CUDA 13 libraries; the image only needs the
# matching user-space base (and a host driver >= 580). `-base-` instead of `-runtime-` is
# ~2 GB smaller and works too, since torch brings cuBLAS/cuDNN itself.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- builder: a virtualenv with the pinned dependencies and the project -------------------
FROM ${UBUNTU_IMAGE} AS builder
ARG VARIANT
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Ubuntu's python3 is the same 3.12 in both runtime bases, so the venv copies across as is.
# Versions of the OS packages come with the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# Dependencies first (their own layer, rebuilt only when the pins change). The CPU variant
# takes torch's CPU build from PyTorch's index; the pins below then accept it (2.x.y+cpu
# satisfies ==2.x.y) and bring the rest from PyPI.
COPY deploy/docker/requirements.txt /tmp/requirements.txt
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ "${VARIANT}" = "cpu" ]; then \
        pip install --no-deps --index-url "${TORCH_CPU_INDEX}" "$(grep '^torch==' /tmp/requirements.txt)"; \
    fi \
    && pip install -r /tmp/requirements.txt

COPY pyproject.toml README.md /src/
COPY server /src/server
COPY engine /src/engine
COPY model /src/model
COPY harmony /src/harmony
# --no-deps: everything it needs is pinned above; --no-build-isolation: build with the
# pinned setuptools instead of fetching another.
RUN pip install --no-deps --no-build-isolation /src

# ---- runtime bases ------------------------------------------------------------------------
FROM ${UBUNTU_IMAGE} AS runtime-cpu

FROM ${CUDA_IMAGE} AS runtime-gpu
# The server's defaults are CPU/float32; on a GPU run in bf16 (MXFP4 experts stay packed).
ENV GPTOSS_DEVICE=cuda \
    GPTOSS_DTYPE=bfloat16

# ---- the image ----------------------------------------------------------------------------
# runtime-${VARIANT} names one of the two stages above, not an image to tag.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS final
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gptoss \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/gptoss \
        --shell /usr/sbin/nologin gptoss \
    && mkdir -p /models /home/gptoss/.cache \
    && chown gptoss:gptoss /home/gptoss/.cache
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/gptoss-healthcheck

# GPTOSS_HOST: listen on all interfaces inside the container (the port mapping decides
# what is exposed). XDG_CACHE_HOME: where the embedded default model is generated when no
# GPTOSS_MODEL is set (an emptyDir in Kubernetes, where the root filesystem is read-only).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gptoss \
    XDG_CACHE_HOME=/home/gptoss/.cache \
    GPTOSS_HOST=0.0.0.0 \
    GPTOSS_PORT=8000

USER 10001:10001
WORKDIR /home/gptoss
EXPOSE 8000

# Liveness only (the engine loop is alive). A big model loads for minutes: the start period
# covers that; readiness (/ready) is for load balancers and Kubernetes, not for this check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "/usr/local/bin/gptoss-healthcheck"]

# SIGTERM starts the graceful drain (GPTOSS_DRAIN_TIMEOUT seconds); give `docker stop` at
# least that long (`--time`, compose's stop_grace_period).
STOPSIGNAL SIGTERM
# The README's command form; no baked arguments, so the environment configures everything
# and `docker run IMAGE --port 9000 ...` appends flags.
ENTRYPOINT ["python", "-m", "server"]
