#!/usr/bin/env bash
# Set-up and entry points on a fresh machine with Python 3.10+ (nothing else needed):
#   ./dev.sh demo   install the package, run the end-to-end demo on milvus-lite (no server)
#   ./dev.sh test   install everything, run unit + integration tests (the tests start a
#                   real Milvus server themselves: MILVUS_URI, Docker, or the embedded one)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # torch first and pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$1]"
}

# The [llamaindex] extra's store declares pymilvus<3 in every release: resolved together with
# pymilvus 3 it would downgrade pymilvus, so it is added without its dependencies (they are
# llama-index-core, installed here, and pymilvus[milvus-lite], already there).
llamaindex() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "llama-index-core>=0.13,<0.15"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llama-index-vector-stores-milvus>=1.2,<2"
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup train; exec "$VENV/bin/milvus-ltr-router" demo "$@" ;;
  test) setup train,server,dev,metrics,langchain; llamaindex; exec "$VENV/bin/python" -m pytest tests integration_tests -p no:cacheprovider "$@" ;;
  *) echo "usage: ./dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
