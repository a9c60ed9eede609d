# syntax=docker/dockerfile:1
# The NxMesh agent for the docker sidecar pattern (see compose.yaml). Build from the
# repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t nxmesh-agent .
# The image carries nginx too: the agent runs `nginx -t` on every release before the
# swap, and compose.yaml runs the serving nginx from this same image, so the binary that
# tests a configuration is the one that serves it.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY plugins/transport-grpc ./plugins/transport-grpc
RUN pip wheel --no-cache-dir --wheel-dir /wheels . ./plugins/transport-grpc

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light libnginx-mod-stream \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels nxmesh nxmesh-transport-grpc \
 && rm -rf /wheels
COPY deploy/docker/nginx-entrypoint.sh /usr/local/bin/nxmesh-nginx-entrypoint
RUN chmod 0755 /usr/local/bin/nxmesh-nginx-entrypoint \
 && install -d -m 0700 /var/lib/nxmesh-agent
ENV NXMESH_STATE_DIR=/var/lib/nxmesh-agent \
    NXMESH_AGENT__CONF_DIR=/etc/nginx \
    NXMESH_AGENT__DEPLOYMENT_MODE=docker-sidecar \
    NXMESH_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/nxmesh-agent"]
ENTRYPOINT ["nxmesh-agent"]
