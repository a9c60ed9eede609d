# syntax=docker/dockerfile:1
# The NxMesh master (REST API + agent transports). Build from the repository root:
#   docker build -f deploy/docker/master.Dockerfile -t nxmesh-master .
# State (SQLite, keys, the first admin's password) lives in the /var/lib/nxmesh volume;
# set NXMESH_STORAGE_URL=postgresql://... to share PostgreSQL between several masters.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY plugins/transport-grpc ./plugins/transport-grpc
# Wheels for NxMesh, the gRPC transport and every dependency: the runtime stage installs
# offline from them and carries no compiler or build cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels . ./plugins/transport-grpc

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 nxmesh \
 && useradd --system --uid 10001 --gid nxmesh --home-dir /var/lib/nxmesh \
      --shell /usr/sbin/nologin nxmesh \
 && install -d -o nxmesh -g nxmesh -m 0700 /var/lib/nxmesh
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels nxmesh nxmesh-transport-grpc \
 && rm -rf /wheels
ENV NXMESH_STATE_DIR=/var/lib/nxmesh \
    NXMESH_LOG_FORMAT=json \
    NXMESH_MASTER__API_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
USER nxmesh
VOLUME ["/var/lib/nxmesh"]
# 8470: REST API, /docs and the WebSocket transport; 8471: gRPC transport.
EXPOSE 8470 8471
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8470/readyz', timeout=2)"]
ENTRYPOINT ["nxmesh", "master"]
