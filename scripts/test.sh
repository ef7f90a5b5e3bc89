#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU; Triton kernels run
# under TRITON_INTERPRET=1 (set by tests/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q -n 2 --durations=25 "$@"
