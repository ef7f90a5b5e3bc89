"""Benchmark the Triton int8 GEMM against fp16 cuBLAS and torch._int_mm.

    python scripts/bench_int8_gemm.py [--out results/bench_int8_gemm]

On CUDA: for each (M, N, K) — SmolLM2-135M's Linear shapes and 7B-class shapes, M
from decode (1) to prefill (4096) — times (``triton.testing.do_bench``, median)

* ``fp16``      torch.matmul in fp16 (cuBLAS)
* ``int_mm``    torch._int_mm int8 x int8 -> int32 (cuBLASLt; no scales, M > 16 only)
* ``triton``    llmq.kernels.int8_gemm (int8 -> int32 + per-token x per-channel scale epilogue, fp16 out)
* ``triton+q``  llmq.kernels.act_quant + int8_gemm (what W8A8Linear runs per call)

and prints TFLOP/s and the speed-up over fp16; writes ``<out>.json`` and ``<out>.png``.

Without CUDA it only checks correctness on small shapes through the Triton
interpreter (``TRITON_INTERPRET=1``) and says so: no CPU timings are reported,
because interpreter times say nothing about GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are imported

import torch  # noqa: E402

from llmq.kernels.act_quant import act_quant, act_quant_reference  # noqa: E402
from llmq.kernels.int8_gemm import int8_gemm, int8_gemm_reference  # noqa: E402

SMOLLM2 = [(1536, 576), (576, 1536), (576, 576), (192, 576)]  # (N, K): gate/up, down, q/o, k/v
LARGE = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 16, 128, 512, 1024, 2048, 4096]


def cpu_check() -> int:
    print("No CUDA device: checking correctness only, on small shapes, in the Triton interpreter "
          "(TRITON_INTERPRET=1). No timings are reported: interpreter speed says nothing about GPU throughput.")
    bad = 0
    for m, n, k in [(1, 48, 64), (33, 64, 129), (64, 96, 576)]:
        x = torch.randn(m, k, dtype=torch.float16)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        ws = torch.rand(n) * 0.01
        q, s = act_quant(x)
        q_ref, s_ref = act_quant_reference(x)
        y = int8_gemm(q, w, s, ws, out_dtype=torch.float32)
        ok = torch.equal(q, q_ref) and torch.equal(y, int8_gemm_reference(q_ref, w, s_ref, ws, out_dtype=torch.float32))
        bad += not ok
        print(f"  M={m:4d} N={n:4d} K={k:4d}: act_quant + int8_gemm {'bit-exact' if ok else 'MISMATCH'} vs reference")
    return 1 if bad else 0


def quantize_then_gemm(x: torch.Tensor, w8: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """What ``W8A8Linear`` runs per call: per-token quantization, then the int8 GEMM."""
    q, s = act_quant(x)
    return int8_gemm(q, w8, s, ws, out_dtype=torch.float16)


def bench(out: Path) -> None:
    import triton.testing

    def do_bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    dev = torch.device("cuda")
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'fp16':>8} {'int_mm':>8} {'triton':>8} {'triton+q':>8} TFLOP/s | "
          f"{'speed-up triton/fp16':>20}")
    for n, k in SMOLLM2 + LARGE:
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.05
        w8 = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8)
        ws = torch.rand(n, device=dev) * 0.01
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            q, s = act_quant(x)
            flops = 2 * m * n * k
            t = {"fp16": do_bench(lambda: x @ w16.t()),
                 "triton": do_bench(lambda: int8_gemm(q, w8, s, ws, out_dtype=torch.float16)),
                 "triton+q": do_bench(lambda: quantize_then_gemm(x, w8, ws))}
            if m > 16:
                w8t = w8.t()
                t["int_mm"] = do_bench(lambda: torch._int_mm(q, w8t))
            tf = {key: flops / (ms * 1e-3) / 1e12 for key, ms in t.items()}
            row = {"M": m, "N": n, "K": k, "ms": t, "tflops": tf, "speedup_triton_vs_fp16": t["fp16"] / t["triton"]}
            rows.append(row)
            print(f"{m:5d} {n:6d} {k:6d} | {tf['fp16']:8.1f} {tf.get('int_mm', float('nan')):8.1f} "
                  f"{tf['triton']:8.1f} {tf['triton+q']:8.1f}         | {row['speedup_triton_vs_fp16']:20.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SMOLLM2 + LARGE), figsize=(4 * len(SMOLLM2 + LARGE), 3.5), sharey=False)
    for ax, (n, k) in zip(axes, SMOLLM2 + LARGE):
        sel = [r for r in rows if (r["N"], r["K"]) == (n, k)]
        for key in ("fp16", "int_mm", "triton", "triton+q"):
            pts = [(r["M"], r["tflops"][key]) for r in sel if key in r["tflops"]]
            ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N={n} K={k}")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_int8_gemm")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        return cpu_check()
    bench(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
