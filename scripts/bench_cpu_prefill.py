"""The cpu backend's two paths against each other and fp32 / bf16, as M (rows of x) grows.

For each weight scheme and SmolLM2-135M Linear shape (plus its 576 x 49152 head) and each M, times
``layer(x)`` (fp32 activations) with the int4/int8 kernels forced (the crossovers set past M), with
the dequantize + bf16 GEMM path forced (crossovers 1), with the torch reference backend, and
``x @ W.T`` in fp32 and bf16. The *fastest* of ``--repeats`` calls, interleaved across the paths: on a
shared, oversubscribed machine a median measures the scheduler's time slices, the minimum the code.
This is where ``llmq.nn.cpu_dequant.INT4_MIN_M`` / ``INT8_MIN_M`` come from.

    PYTHONPATH=. python scripts/bench_cpu_prefill.py --threads 1 --out docs/benchmarks/cpu_backend
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from bench_cpu_linear import (
    interleaved_samples,  # scripts/ is sys.path[0] when run as a script
)

SCHEMES = {"int4-g128": (4, 128), "int8-chan": (8, None), "int8-g128": (8, 128)}
SHAPES = ["576x576", "576x1536", "1536x576", "576x49152"]  # K x N: q/o, gate/up, down, lm_head


def _time(fns: dict, repeats: int) -> dict:
    """Fastest ms per call of each fn (interleaved calls, 2 warm-up rounds)."""
    return {name: min(s) * 1e3 for name, s in interleaved_samples(fns, repeats, warmup=2).items()}


@torch.no_grad()
def bench(k: int, n: int, scheme: str, ms: list[int], repeats: int) -> list[dict]:
    from llmq.nn import QuantLinear, cpu_dequant
    from llmq.quant.primitives import quantize_weight

    bits, group = SCHEMES[scheme]
    w = torch.randn(n, k) / k ** 0.5
    qw = quantize_weight(w, bits, group, False)
    layer = QuantLinear.from_quantized(qw)
    ref = QuantLinear.from_quantized(qw, backend="torch")
    wb = w.bfloat16()
    rows = []
    for m in ms:
        x = torch.randn(m, k)
        xb = x.bfloat16()

        def path(min_m):
            def run():
                saved = cpu_dequant.INT4_MIN_M, cpu_dequant.INT8_MIN_M
                cpu_dequant.INT4_MIN_M = cpu_dequant.INT8_MIN_M = min_m
                try:
                    layer(x)
                finally:
                    cpu_dequant.INT4_MIN_M, cpu_dequant.INT8_MIN_M = saved
            return run

        fns = {"kernel": path(m + 1), "dequant_bf16": path(1), "fp32": lambda: x @ w.T, "bf16": lambda: xb @ wb.T}
        if n * k <= 576 * 1536:
            fns["torch_ref"] = lambda: ref(x)
        t = _time(fns, repeats if n * k <= 576 * 1536 else max(3, repeats // 3))
        rows.append({"shape": f"{k}x{n}", "scheme": scheme, "m": m, **{f"{p}_ms": v for p, v in t.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512])
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    rows = []
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for scheme in args.schemes:
            rows += bench(k, n, scheme, args.m, args.repeats)
    meta = {"threads": args.threads, "load_start": load0, "load_end": os.getloadavg()[0],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu_prefill.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    cols = ["kernel", "dequant_bf16", "fp32", "bf16", "torch_ref"]
    lines = [f"threads {args.threads}, load average {load0:.1f} -> {meta['load_end']:.1f}, "
             f"ms per call (fastest of {args.repeats})", "",
             "| K x N | scheme | M | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for r in rows:
        cells = [f"{r[c + '_ms']:.3f}" if c + "_ms" in r else "–" for c in cols]
        lines.append(f"| {r['shape']} | {r['scheme']} | {r['m']} | " + " | ".join(cells) + " |")
    (args.out / "bench_cpu_prefill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
