# syntax=docker/dockerfile:1
#
# mondeq serving image: `mondeq serve` on 0.0.0.0:8000 (HTTP) and :8001 (gRPC) with the default
# models baked in.
#
#   docker build -t mondeq:latest .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v mondeq-models:/models mondeq:latest
#
# Base and PyTorch: the CUDA image and the PyTorch wheel index are chosen together.
#   * CUDA_IMAGE is nvidia/cuda's `base` flavour (CUDA 13.0, Ubuntu 24.04, pinned to a patch
#     release). The PyTorch CUDA wheels bring their own CUDA user-space libraries (cuBLAS,
#     cuDNN, ... as nvidia-* wheels), so the `runtime` flavour would only add a second,
#     unused copy of them (~2 GB). What the base image does give: Ubuntu 24.04 (Python 3.12,
#     project needs >= 3.11), NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES for the
#     NVIDIA container toolkit, and NVIDIA_REQUIRE_CUDA, with which the toolkit refuses to
#     start the container on a host driver too old for CUDA 13.0 (R580+) instead of failing
#     later inside torch.
#   * TORCH_INDEX_URL is the matching download.pytorch.org index (cu130) and TORCH_VERSION /
#     TORCHVISION_VERSION the pair the project is developed and tested with (2.14.1+cu130,
#     0.29.1); pyproject.toml accepts torch >= 2.3, < 2.15.
# To change CUDA, move all three together, e.g. for an older driver
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (with a torch release that has cu128 wheels). `-runtime-` images work as well, only bigger.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with torch (CUDA build) and the project.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Distribution packages are not version-pinned on purpose: see .hadolint.yaml (DL3008).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and on its own layer: it is the big download (~3 GB with its CUDA libraries) and
# changes far less often than the project's code.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The project as a regular (non-editable) install: pip builds its wheel and installs it with
# the training and serving extras from PyPI; torch/torchvision above already satisfy their ranges.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model_core ./model_core
COPY mondeq_cli ./mondeq_cli
COPY training ./training
COPY service ./service
RUN pip install --no-cache-dir "./[all]" \
    && python -c "import model_core, service, training, torch; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------
# runtime: the venv, the default models, a non-root user. No compiler, no pip cache.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mondeq" \
      org.opencontainers.image.description="monDEQ classifiers over HTTP (KServe V2, friendly API, Prometheus metrics)" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive
# The venv's python is a symlink to /usr/bin/python3, so the runtime needs the same
# interpreter as the builder (same base image, same Ubuntu python3 package).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mondeq \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --create-home --home-dir /home/mondeq --shell /usr/sbin/nologin mondeq

COPY --from=builder /opt/venv /opt/venv

# Model repository. MONDEQ_MODEL_DIR points at /models, which holds the default models
# (fmnist-fc/1, fmnist-conv/1) and is a VOLUME:
#   * a named volume (`-v mondeq-models:/models`, what docker-compose.yml uses) is seeded by
#     Docker with these defaults the first time it is created; models copied into it later
#     (`docker cp ./my-model/. <container>:/models/my-model/1/`) are picked up by the server's
#     rescan (MONDEQ_POLL_INTERVAL_S) and survive container re-creation. The seeding happens
#     only once: a newer image's defaults do not replace what an existing volume holds.
#   * a bind mount (`-v /srv/models:/models`) shows only what the host folder holds (no
#     seeding): copy the defaults out first if you want them (see docs/deploy.md).
#   * one extra model without replacing anything: bind it below the defaults,
#     `-v /srv/my-model:/models/my-model:ro`.
# Owned by the service user, and so is a named volume seeded from it.
COPY --chown=10001:10001 models /models
VOLUME ["/models"]

# Every setting of `mondeq serve` is a MONDEQ_* variable (docs/service.md has the full list);
# override them with `docker run -e` / compose `environment:`. The CMD's --host wins over
# MONDEQ_HOST: inside a container the server must listen on all interfaces.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MONDEQ_MODEL_DIR=/models \
    MONDEQ_PORT=8000 \
    MONDEQ_GRPC_PORT=8001 \
    MONDEQ_DEVICE=auto \
    MONDEQ_LOG_LEVEL=info

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/mondeq
# HTTP (KServe V2, friendly API, metrics), then gRPC (KServe V2).
EXPOSE 8000
EXPOSE 8001

# Ready, not merely live: 503 while the models load (and α is tuned), with no model, or while
# shutting down. start-period covers the load: seconds on a GPU, minutes on a small CPU (the α
# search at load). python's urllib is in the image, curl is not.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MONDEQ_PORT', '8000') + '/v2/health/ready', timeout=4)"]

CMD ["mondeq", "serve", "--host", "0.0.0.0"]
