#!/usr/bin/env bash
# The main job on the embedded default model: set up, quantize SmolLM2-135M to
# 4-bit (group 128), generate from the checkpoint, and evaluate its perplexity
# next to the float model's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out/smollm2-w4g128}
llmq quantize smollm2-135m --bits 4 --group 128 --out "$OUT" --force
llmq generate "$OUT" --prompt "The capital of France is" --max-new-tokens 24
echo "int4 g128:"; llmq eval "$OUT" --ppl --json
echo "fp32:";      llmq eval smollm2-135m --ppl --json
