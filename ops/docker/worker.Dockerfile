# syntax=docker/dockerfile:1
# The vlmq worker image, built from the repository root (ops/docker-compose.yml does this):
#   docker build -f ops/docker/worker.Dockerfile --target gpu -t vlmq-worker:gpu .
#   docker build -f ops/docker/worker.Dockerfile --target cpu -t vlmq-worker:cpu .
# gpu: the PyTorch CUDA runtime image (torch preinstalled, CUDA from the image, the NVIDIA
# driver from the host through the NVIDIA container toolkit). cpu: Python slim with a CPU
# torch wheel. Both run `vlmq worker`, configured by VLMQ_* environment variables.

# transformers 5 needs torch >= 2.6; CUDA 12.6 runs on drivers >= 525 (minor-version compatibility).
ARG CUDA_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
ARG CPU_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- sources
FROM ${CPU_IMAGE} AS src
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY broker broker
COPY inference_worker inference_worker
COPY env_agents env_agents
COPY ops ops

# ---------------------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ARG EXTRAS=worker,ops
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLMQ_DEVICE=cuda VLMQ_METRICS_PORT=9100
WORKDIR /app
COPY --from=src /src /app
# torch comes with the base image; pip keeps it because it satisfies the worker extra.
RUN pip install ".[${EXTRAS}]"
RUN useradd --create-home --uid 10001 vlmq
USER vlmq
EXPOSE 9100
STOPSIGNAL SIGTERM
CMD ["vlmq", "worker"]

# ---------------------------------------------------------------------------- cpu
FROM ${CPU_IMAGE} AS cpu
ARG EXTRAS=worker,ops
ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLMQ_DEVICE=cpu VLMQ_METRICS_PORT=9100
WORKDIR /app
COPY --from=src /src /app
# The CPU wheel first, or pip would resolve the multi-GB CUDA build of torch.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install ".[${EXTRAS}]"
RUN useradd --create-home --uid 10001 vlmq
USER vlmq
EXPOSE 9100
STOPSIGNAL SIGTERM
CMD ["vlmq", "worker"]
