"""QuantLinear on the CPU: the ``cpu`` backend vs the ``torch`` reference vs fp32 / bf16 ``nn.Linear``.

For each weight scheme (int4 g64/g128, int3 g64, int2 g64, int8 per channel, and int8 g128, which the
cpu backend declines) and each SmolLM2-135M Linear shape, times ``layer(x)`` at M = 1 (decode) and
M = 128 (prefill) with fp32 activations: the backend chosen automatically and the forced torch
reference, against ``x @ W.T`` in fp32 and bf16. Medians of ``--repeats`` timed calls, interleaved
across the compared paths so a shared machine's load hits all of them alike.

    python scripts/bench_cpu_linear.py                      # -> results/bench_cpu_linear.{json,md}
    python scripts/bench_cpu_linear.py --shapes 4096x4096   # one larger layer

Writes ``results/bench_cpu_linear.json`` (one object per measurement, with threads and load average)
and a markdown table (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SCHEMES = {"int4-g128": (4, 128), "int4-g64": (4, 64), "int3-g64": (3, 64), "int2-g64": (2, 64),
           "int8-chan": (8, None), "int8-g128": (8, 128)}
SMOLLM2_SHAPES = ["576x576", "576x192", "576x1536", "1536x576"]  # K x N: q/o, k/v, gate/up, down


def interleaved_samples(fns: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call of each fn, the fns called round-robin (so load changes hit them alike), after
    ``warmup`` untimed rounds. Also used by scripts/bench_cpu_prefill.py."""
    samples = {name: [] for name in fns}
    for i in range(repeats + warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def _time(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each fn (``interleaved_samples``)."""
    return {name: statistics.median(s) for name, s in interleaved_samples(fns, repeats).items()}


@torch.no_grad()
def bench_shape(k: int, n: int, scheme: str, m: int, repeats: int) -> dict:
    from llmq.nn import QuantLinear
    from llmq.quant.primitives import quantize_weight

    bits, group = SCHEMES[scheme]
    w = torch.randn(n, k) / k ** 0.5
    qw = quantize_weight(w, bits, group, symmetric=False)
    auto = QuantLinear.from_quantized(qw)
    ref = QuantLinear.from_quantized(qw, backend="torch")
    x = torch.randn(m, k)
    wf, wb, xb = w.contiguous(), w.bfloat16().contiguous(), x.bfloat16()
    chosen = auto.backend_for(x).name
    times = _time({"auto": lambda: auto(x), "torch": lambda: ref(x), "fp32": lambda: x @ wf.t(),
                   "bf16": lambda: xb @ wb.t()}, repeats)
    err = (auto(x) - ref(x)).abs().max().item() / ref(x).abs().max().item()
    return dict(k=k, n=n, m=m, scheme=scheme, backend=chosen, us={key: v * 1e6 for key, v in times.items()},
                rel_err_vs_torch=err)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SMOLLM2_SHAPES, help="KxN Linear shapes")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 128], help="activation rows")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        for scheme in args.schemes:
            for m in args.m:
                r = bench_shape(k, n, scheme, m, args.repeats)
                r.update(threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0])
                rows.append(r)
                print(json.dumps(r))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench_cpu_linear.json.tmp"
    tmp.write_text(json.dumps(dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                                   runs=rows), indent=1))
    tmp.replace(out / "bench_cpu_linear.json")
    table = table_md(rows)
    (out / "bench_cpu_linear.md").write_text(table)
    print(table)
    return 0


def table_md(rows: list[dict]) -> str:
    lines = ["| K×N | M | weights | backend | backend µs | torch ref µs | fp32 µs | bf16 µs | vs torch ref | vs fp32 "
             "| rel. err vs ref | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = r["us"]
        lines.append(f"| {r['k']}×{r['n']} | {r['m']} | {r['scheme']} | {r['backend']} | {us['auto']:.0f} | "
                     f"{us['torch']:.0f} | {us['fp32']:.0f} | {us['bf16']:.0f} | {us['torch'] / us['auto']:.1f}x | "
                     f"{us['fp32'] / us['auto']:.2f}x | {r['rel_err_vs_torch']:.1e} | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
