# syntax=docker/dockerfile:1
# kvstore's image: `docker build -t kvstore .`, then run it beside a Redis
# with KVSTORE_REDIS_URL set (compose.yaml does both).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build: a virtual environment with the pinned dependencies, then kvstore.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/kvstore
COPY constraints.txt ./
RUN /opt/kvstore/bin/pip install --no-cache-dir --requirement constraints.txt
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
RUN /opt/kvstore/bin/pip install --no-cache-dir --no-deps . \
    && /opt/kvstore/bin/kvstore --version

# Run: the environment alone, as an unprivileged user.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 kvstore \
    && useradd --system --uid 10001 --gid kvstore --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin kvstore \
    && install --directory --owner kvstore --group kvstore /var/lib/kvstore
COPY --from=build /opt/kvstore /opt/kvstore
ENV PATH=/opt/kvstore/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KVSTORE_BIND=0.0.0.0:5000 \
    KVSTORE_DATA_DIR=/var/lib/kvstore
WORKDIR /var/lib/kvstore
USER 10001:10001
EXPOSE 5000 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["kvstore", "serve"]
