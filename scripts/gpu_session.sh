#!/usr/bin/env bash
# Everything a (rarely lent) CUDA GPU should check, as one script: the GPU tests, then each benchmark.
#
#   bash scripts/gpu_session.sh [RESULTS_DIR] [TOTAL_SECONDS] [SNAPSHOT.tgz]
#
# Sized for one 600-second device call (TOTAL 570): stage limits come from the H200 runs of
# 2026-11-26 (BENCHMARKS.md) — GPU tests ~90 s at -n 12 (compiles dominate), bench_kernels ~22 s per
# linear shape with CUDA-graph timings (8 shapes), KV attention 21 s, int8 GEMM 32 s, a 32k generate
# pair 40 s (+ ~30 s to build a 7B model with int4 weights). The benchmarks write their JSON as they go.
# The stages run in priority order (weight kernels, KV kernel, MoE, compiled decode, generate, the
# rest); their limits add up to more than 570 s, so the last ones are skipped when the call's time
# runs out. GPU_STAGES=name,name,... runs only the named stages (e.g. a second call:
# GPU_STAGES=bench_compile,bench_generate,bench_kernels_int8 bash scripts/gpu_session.sh results/gpu2).
# Each stage runs under its own time limit (cut to fit TOTAL_SECONDS, default 570) so a slow or
# failing stage costs only itself; logs, JSON and plots go to RESULTS_DIR (default results/gpu) and,
# after every stage, into SNAPSHOT (default RESULTS_DIR.tgz), so whatever finished survives a kill. Needs the GPU
# image's torch / triton / transformers; installs llmq itself without dependencies or network.
set -u
RESULTS=${1:-results/gpu}
TOTAL=${2:-570}
SNAPSHOT=${3:-$RESULTS.tgz}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
START=$SECONDS

snapshot() { tar czf "$SNAPSHOT" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null; }

# stage NAME SECONDS CMD...: run CMD with a limit of SECONDS (never past TOTAL), log to RESULTS/NAME.log
stage() {
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_STAGES:-}" ] && [[ ",$GPU_STAGES," != *",$name,"* ]]; then return; fi
  local left=$((TOTAL - (SECONDS - START) - 10))
  if [ "$left" -lt 20 ]; then echo "=== $name SKIPPED: ${left}s left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  tail -n "${TAIL:-25}" "$RESULTS/$name.log"
  snapshot
}

python3 -m pip install -q --no-deps --no-build-isolation -e . > "$RESULTS/install.log" 2>&1 || {
  echo "install failed"; cat "$RESULTS/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
} | tee "$RESULTS/device.txt"

stage tests 110 python3 -m pytest -q -m gpu -n 12 -p no:cacheprovider -rfE tests
# every regime (gemv / fused gemm / dequantize+cuBLAS, forced and as the table picks) vs cuBLAS fp16 and tinygemm;
# writes the measured crossover table (copy crossover.json to llmq/data/kernel_crossover.json to ship it)
TAIL=45 stage bench_kernels_int4 230 python3 scripts/bench_kernels.py --models llama-2-7b llama-3-8b llama-2-70b \
  --out "$RESULTS/bench_kernels_int4.json" --plot "$RESULTS/bench_kernels_int4.png" \
  --crossover "$RESULTS/crossover.json"
TAIL=40 stage bench_kv_attention 70 python3 scripts/bench_kv_attention.py --contexts 32768 --sweep \
  --out "$RESULTS/bench_kv_attention"
# --- MoE (issue 18) -------------------------------------------------------------------------------
# grouped quantized-experts kernel vs the torch backend vs float experts, one Qwen3-30B-A3B MoE layer
TAIL=12 stage bench_moe 60 python3 scripts/bench_moe.py --tokens 1 4 16 64 256 --out "$RESULTS/bench_moe.json"
# --- end MoE ---------------------------------------------------------------------------------------
# --- issue 16: compiled decode with static caches (llmq bench --compile) --------------------------------
# Static caches + torch.compile(mode="reduce-overhead": CUDA graphs), 7B-shaped random model, 32k context,
# fp vs int4 weights x fp16 vs int4 KV, batch 1 and the largest batch in 80 GB, plus the eager fp16 baseline.
# Never timed on a GPU: each configuration compiles the 32-layer forward once (inductor; minutes on the first
# run, less with a warm cache), so this stage covers only the headline points; the full matrix
# (--contexts 1024 8192 32768 --kv fp 8 4 2) needs a call of its own.
TAIL=30 stage bench_compile 240 python3 -m llmq.cli.main bench --compile --contexts 32768 --weights int4 fp \
  --kv fp 4 --new-tokens 32 --memory-budget-gb 80 --out "$RESULTS/bench_compile"
# --- end issue 16 -------------------------------------------------------------------------------------------
TAIL=20 stage bench_generate 110 python3 scripts/bench_generate.py --contexts 32768 --weights fp int4 \
  --kv fp 4 --new-tokens 32 --memory-budget-gb 80 --out "$RESULTS/generate"
TAIL=52 stage bench_int8_gemm 40 python3 scripts/bench_int8_gemm.py --out "$RESULTS/bench_int8_gemm"
TAIL=12 stage bench_kernels_int8 45 python3 scripts/bench_kernels.py --bits 8 2 --ms 1 16 4096 --models llama-2-70b \
  --out "$RESULTS/bench_kernels_int8.json" --plot "$RESULTS/bench_kernels_int8.png"
TAIL=12 stage bench_kernels_float_zeros 40 python3 scripts/bench_kernels.py --asym --zero-point float --ms 1 16 4096 \
  --models llama-2-70b --out "$RESULTS/bench_kernels_float_zeros.json" --plot "$RESULTS/bench_kernels_float_zeros.png"
echo "=== done in $((SECONDS - START))s"
