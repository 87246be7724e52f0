# syntax=docker/dockerfile:1
# The thin agent image: the core install (redis, msgpack, numpy, pydantic: no torch) plus
# the simulators and the metrics endpoint. Built from the repository root:
#   docker build -f ops/docker/agent.Dockerfile -t vlmq-agents .
# EXTRAS="" gives the bare client for your own simulator code.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG EXTRAS=envs,ops
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Headless OpenGL (EGL/Mesa) for MiniWorld's renderer; g++ and make for the fast-downward
# build that alfworld's textworld[pddl] runs at install.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libegl1 libgl1-mesa-dri libglu1-mesa g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY broker broker
COPY inference_worker inference_worker
COPY env_agents env_agents
COPY ops ops
RUN if [ -n "${EXTRAS}" ]; then pip install ".[${EXTRAS}]"; else pip install .; fi
RUN useradd --create-home --uid 10001 vlmq
USER vlmq
# `vlmq agents` writes its report under runs/: the user's home is writable, /app is not.
WORKDIR /home/vlmq
EXPOSE 9101
CMD ["vlmq", "agents"]
