#!/usr/bin/env bash
# The main job on the embedded default model: set up, quantize SmolLM2-135M to
# 4-bit (group 128), generate from the checkpoint, and evaluate its perplexity
# next to the float model's. Progress bars go to stderr; the JSON lines to stdout.
# The output folder is the demo's own (out/demo-w4g128), so the README's
# step-by-step commands (which write out/smollm2-w4g128) work right after it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-out/demo-w4g128}
llmq quantize smollm2-135m --bits 4 --group 128 --out "$OUT" --force
llmq generate "$OUT" --prompt "The capital of France is" --max-new-tokens 24
echo "int4 g128:"; Q=$(llmq eval "$OUT" --ppl --json); echo "$Q"
echo "fp32:";      F=$(llmq eval smollm2-135m --ppl --json); echo "$F"
"${PYTHON:-python3}" - "$Q" "$F" <<'PY'
import json, sys
q, f = (json.loads(a)["perplexity"] for a in sys.argv[1:])
print(f"perplexity int4 g128 {q:.3f} vs fp32 {f:.3f}: {q - f:+.3f} ({100 * (q / f - 1):+.1f}%)")
PY
