#!/usr/bin/env bash
# Set up a fresh machine for NxMesh: system packages (when root), the venv, every
# distribution in this repository. Idempotent: re-running only fills what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# prometheus only for promtool, which checks the agent's metrics exposition in the tests.
# php-fpm: the FastCGI application server the FastCGI locations are tested against.
# libnginx-mod-stream: nginx's stream module (TCP/UDP streams), a dynamic module in Debian.
# python3-venv: Debian ships ensurepip (which `python3 -m venv` needs) only in it.
APT_PACKAGES=(nginx-light libnginx-mod-stream pebble wrk prometheus python3-venv php-fpm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
installed_nginx=0
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        [[ " ${missing[*]} " == *" nginx-light "* ]] && installed_nginx=1
    else
        echo "setup: warning: missing system packages ${missing[*]} (install them as root)" >&2
    fi
fi
# Debian starts the packaged nginx on install where it can; NxMesh runs its own, so the
# one this run's install started is stopped. An nginx that was already running is this
# host's business: it is left serving.
if [[ -f /run/nginx.pid ]]; then
    if ((installed_nginx)) && [[ -x /usr/sbin/nginx ]]; then
        /usr/sbin/nginx -s quit 2>/dev/null || true
    else
        echo "setup: note: this host's nginx is running (/run/nginx.pid); NxMesh starts" \
            "nginx processes of its own and leaves it alone"
    fi
fi

# The venv is there when its pip works: without ensurepip, Debian's venv leaves bin/python
# behind and fails, and a re-run must make it again rather than fail at "-m pip".
if ! "$VENV/bin/pip" --version >/dev/null 2>&1; then
    venv_args=()
    # Clear only a venv (pyvenv.cfg), never whatever other directory $VENV names.
    [[ -f $VENV/pyvenv.cfg ]] && venv_args+=(--clear)
    echo "setup: creating $VENV"
    if ! "$PYTHON" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VENV"; then
        echo "setup: error: $PYTHON -m venv failed; on Debian/Ubuntu install python3-venv" \
            "(as root: apt-get install python3-venv) and run this again" >&2
        exit 1
    fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Core (editable, with dev tools) plus every plugin distribution and example plugin.
args=(-e ".[dev]")
for dist in plugins/*/ examples/*/; do
    [[ -f $dist/pyproject.toml ]] && args+=(-e "$dist")
done
"$VENV/bin/python" -m pip install -q "${args[@]}"
echo "setup: ready ($VENV)"
