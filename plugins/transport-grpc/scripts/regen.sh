#!/usr/bin/env bash
# Regenerate src/nxmesh_transport_grpc/_generated/ from proto/agent.proto.
#
# Needs grpcio-tools (a dev-only tool: it bundles protoc; the runtime needs only protobuf
# and grpclib) and grpclib's protoc plugin (protoc-gen-grpclib_python, installed with
# grpclib) in the venv:  .venv/bin/pip install grpcio-tools
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
VENV=${VENV:-$repo/.venv}
out="$here/src/nxmesh_transport_grpc/_generated"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m grpc_tools.protoc \
    -I "$here/proto" \
    --python_out="$tmp" --pyi_out="$tmp" --grpclib_python_out="$tmp" \
    "$here/proto/agent.proto"

# protoc writes top-level imports ("import agent_pb2"); the package needs relative ones.
sed -i 's/^import agent_pb2$/from . import agent_pb2/' "$tmp/agent_grpc.py"
for f in agent_pb2.py agent_grpc.py; do
    { echo "# mypy: ignore-errors"; cat "$tmp/$f"; } > "$out/$f"
done
# google.protobuf ships no type stubs: the .pyi still gives mypy the message classes.
{ echo "# mypy: ignore-errors"; cat "$tmp/agent_pb2.pyi"; } > "$out/agent_pb2.pyi"
echo "regenerated $out"
