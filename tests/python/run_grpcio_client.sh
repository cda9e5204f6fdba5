#!/usr/bin/env bash
# Runs a script of tests/python (grpcio_client.py unless another is named) with a client no one
# on the team wrote (Python grpcio from PyPI) and stubs generated from our .proto files at run
# time. Creates the virtualenv on first use.
#   API_ADDR=127.0.0.1:50051 API_TOKEN=... tests/python/run_grpcio_client.sh [grpcio_sequential.py]
# Called by tests/tests/api_grpcio.rs (cargo test) and by bench-api (grpcio_sequential.py); the
# venv lives outside the repository.
set -Eeuo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
VENV=${SWITCHBOARD_PY_VENV:-$HOME/.cache/switchboard/grpcio-venv}
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
  echo "grpcio test: creating $VENV (pip install grpcio grpcio-tools)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet grpcio grpcio-tools >&2
fi
STUBS=$(mktemp -d)
trap 'rm -rf "$STUBS"' EXIT
WELL_KNOWN=$("$VENV/bin/python" -c "import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))")
cd "$REPO_ROOT/proto"
"$VENV/bin/python" -m grpc_tools.protoc -I . -I "$WELL_KNOWN" --python_out="$STUBS" --grpc_python_out="$STUBS" \
  switchboard/events/v1/events.proto switchboard/api/v1/conversations.proto switchboard/api/v1/workspace.proto \
  switchboard/api/v1/admin.proto
SCRIPT=${1:-grpcio_client.py}
# No exec: the EXIT trap must still remove the generated stubs.
PYTHONPATH=$STUBS "$VENV/bin/python" "$REPO_ROOT/tests/python/$SCRIPT"
