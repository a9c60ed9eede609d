#!/bin/sh
# nginx's container in the sidecar pattern (compose.yaml): run nginx the way the agent's
# docker-sidecar mode expects — prefix and config on the shared volume, pid file in
# <conf_dir>/logs — so the agent can test, swap and reload it.
#
# Before the agent's first release there is no <conf_dir>/current: seed a one-server
# "bootstrap" release answering 503, so nginx runs (and the agent has a master process
# to signal) from the start. The agent's first apply replaces it atomically.
set -eu
CONF_DIR=${NXMESH_AGENT__CONF_DIR:-/etc/nginx}

if [ ! -e "$CONF_DIR/current/nginx.conf" ]; then
    mkdir -p "$CONF_DIR/releases/bootstrap" "$CONF_DIR/logs" "$CONF_DIR/tmp"
    cat > "$CONF_DIR/releases/bootstrap/nginx.conf" <<'CONF'
worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 80 default_server;
        return 503 "waiting for the first configuration from NxMesh\n";
    }
}
CONF
    ln -sfn releases/bootstrap "$CONF_DIR/current"
fi

exec nginx -g 'daemon off;' -p "$CONF_DIR/" -c "$CONF_DIR/current/nginx.conf"
