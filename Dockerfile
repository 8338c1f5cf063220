# IM-Backend container image.
#
#   docker build -t im_backend .
#   docker run -p 8181:8181 -v "$PWD/configs/compose:/data/config" im_backend
#
# The bootstrap file is read from /data/config/config.yaml (Nacos, or `app_conf:` a file next to it).
# Workers: env IM_WORKERS (default 1). Port: env IM_PORT (default 8181). With several workers, im_backend.py
# makes a fresh PROMETHEUS_MULTIPROC_DIR under /tmp at each start, so one /metrics scrape sums them all.
#
# BASE_IMAGE may be any Debian-like image with Python 3.11+ and the venv module (python:3.11-slim,
# or a local Debian bookworm image with python3 + python3-venv; see tests/container_smoke.sh).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Optional pip settings for the build only (a mirror, an extra CA bundle), e.g.
#   --build-arg PIP_INDEX=https://your-pypi-mirror/simple --build-arg PIP_CA_CERT=/path/in/build
ARG PIP_INDEX=""
ARG PIP_CA_CERT=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first (their own layer, rebuilt only when the pins change). A virtual environment keeps
# them apart from the base image's Python (works on python:*-slim and on Debian's own python3 alike).
COPY requirements-runtime.txt constraints.txt ./
RUN set -eux; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install \
        ${PIP_INDEX:+--index-url "$PIP_INDEX"} ${PIP_CA_CERT:+--cert "$PIP_CA_CERT"} \
        -r requirements-runtime.txt -c constraints.txt; \
    /opt/venv/bin/python -c "import asyncpg, Crypto.Cipher.AES, hiredis, httptools, orjson, prometheus_client, redis, uvicorn, uvloop, yaml"; \
    groupadd --gid 10001 im; \
    useradd --uid 10001 --gid im --home-dir /app --no-create-home --shell /usr/sbin/nologin im; \
    mkdir -p /data/config /data/state; \
    chown im:im /data/config /data/state

COPY im_backend.py ./
COPY configs/ ./configs/

USER im

# IM_STATE_DIR: where the last good Nacos configuration is kept for start-ups while Nacos is down.
ENV IM_HOST=0.0.0.0 \
    IM_PORT=8181 \
    IM_WORKERS=1 \
    IM_STATE_DIR=/data/state

EXPOSE 8181
VOLUME ["/data/config", "/data/state"]

# No curl in slim images: ask /healthz with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('IM_PORT', '8181'), timeout=4).status == 200 else 1)"]

# --workers defaults to $IM_WORKERS, --host/--port to $IM_HOST/$IM_PORT (see `python im_backend.py -h`).
CMD ["python", "im_backend.py", "-conf", "/data/config/config.yaml"]
