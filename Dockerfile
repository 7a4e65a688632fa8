# sglora on a GPU node: the CUDA 13.0 runtime, torch 2.11.0 and triton 3.6.0 (the GPU stack the
# project is tested on; PyPI's torch 2.11.0 Linux wheel is the CUDA 13.0 build and pins that
# triton), the package with the router and demo extras, run as a non-root user.
#
#   docker build -t sglora .
#   docker run --gpus all -p 30000:30000 -v hf-cache:/cache/huggingface sglora      # the demo
#   docker run --gpus all -p 30000:30000 -v hf-cache:/cache/huggingface sglora \
#       --host 0.0.0.0 --model-path Qwen/Qwen3-30B-A3B --tp-size 1
#
# Arguments replace CMD, so pass --host 0.0.0.0 with your own (the server's default is loopback).
# CI lints this file with hadolint and runs its pip steps with CPU wheels
# (tests/deploy/test_docker_install.py, which overrides TORCH_SPEC like --build-arg would).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# Triton compiles a small C launcher per kernel signature at run time: hence gcc and the
# Python headers. Versions come from the base image's Ubuntu release, not pins (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv

# torch first, in its own layer: gigabytes that change far less often than sglora does.
# The pins live in TORCH_SPEC, where hadolint cannot see them (DL3013); unquoted so it splits.
ARG TORCH_SPEC="torch==2.11.0 triton==3.6.0"
# hadolint ignore=DL3013,SC2086
RUN pip install $TORCH_SPEC

WORKDIR /opt/sglora
COPY pyproject.toml README.md ./
COPY sglora ./sglora
# The import proves the installed set works together (torch, triton, fastapi, the router,
# peft for --demo); -I keeps the source tree in this directory off sys.path.
# This project's own source: its dependencies' bounds are in pyproject.toml (DL3013).
# hadolint ignore=DL3013
RUN pip install ".[router,demo]" \
    && python -I -c "import sglora.server.launch, sglang_router.launch_router, peft"

# Model weights (HF_HOME) persist in a volume; --demo builds its tiny model under /cache/sglora.
# A numeric USER lets Kubernetes' runAsNonRoot check it without reading /etc/passwd.
RUN useradd --create-home --uid 10001 sglora \
    && mkdir -p /cache/huggingface /cache/sglora /adapters \
    && chown -R sglora:sglora /cache /adapters
ENV HF_HOME=/cache/huggingface \
    SGLORA_CACHE_DIR=/cache/sglora
VOLUME ["/cache/huggingface"]
USER 10001:10001
WORKDIR /home/sglora

EXPOSE 30000
# /health runs (or reuses) a real forward pass. The start period covers downloading and
# loading a large checkpoint; failures inside it do not count.
HEALTHCHECK --interval=30s --timeout=30s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30000/health', timeout=25)"]
ENTRYPOINT ["python", "-m", "sglora.launch_server"]
CMD ["--host", "0.0.0.0", "--port", "30000", "--demo"]
