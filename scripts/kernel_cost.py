#!/usr/bin/env python
"""The kernel cost report: compile every shipped weight-kernel config as the launcher launches it, count
its hot loop's SASS and predict its time on an H200 / H100 (no GPU needed; docs/kernels.md, "Cost report").

    python scripts/kernel_cost.py                                  # 4-bit g128 fp16, 8192x8192 and 8192x28672, M 1/16/4096
    python scripts/kernel_cost.py --bits 2 4 8 --ms 1 16 --device h100 --out cost.json
    python scripts/kernel_cost.py --fit                            # the model against BENCHMARKS.md's H200 run 1
    python scripts/kernel_cost.py --moe --ms 1 16 64               # the grouped MoE kernel (kernels/moe_cost.py)
    python scripts/kernel_cost.py --kv --out docs/benchmarks/kv_cost_h200.json     # the KV decode kernel
    python scripts/kernel_cost.py --lut --bits 1 2 3 4 --out docs/benchmarks/lut_cost_h200.json  # lookup tables

One JSON record per (kernel, config, shape, M): ``instr_per_code``, ``dram_us``, ``issue_us``,
``predicted_us``, ``bound``, the per-class counts and the rest (``llmq.kernels.cost_cases.Record``).
The table shows the candidate the model ranks fastest per case (``--all``: every candidate).
Predictions are a model, not measurements: never quote them as GPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real triton.language (see kernels/dequant_aot.py)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmq.kernels import cost_cases, dequant_cost  # noqa: E402,F401  (dequant_cost registers its builders)
from llmq.kernels.cost_model import DEVICES  # noqa: E402

COLUMNS = ("kernel", "config", "workload", "shape", "M", "registers", "instr_per_iter", "instr_per_code",
           "dram_us", "issue_us", "pipe_us", "tensor_us", "latency_us", "predicted_us", "cublas_fp16_us", "bound")


def parse_shape(s: str) -> tuple[int, int]:
    k, n = s.lower().split("x")
    return int(k), int(n)


def run(workloads, device, families=None, capability=90, log=print):
    records = []
    for w in workloads:
        for case in cost_cases.cases(w, families):
            try:
                rec = cost_cases.evaluate(case, device, capability)
            except Exception as e:  # noqa: BLE001 — a config that fails to compile is reported, not fatal
                rec = cost_cases.Record(case.family, case.kernel_name, case.config, w.label, f"{w.k}x{w.n}", w.m,
                                        device.name, error=f"{type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            if log:
                log(f"  compiled {rec.kernel} {rec.config} {rec.shape} M={rec.M}"
                    + (f" ERROR {rec.error}" if rec.error else f": {rec.instr_per_code:.2f} instr/code"))
    cost_cases.mark_picks(records)
    return records


CROSSOVER_MS = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
CLASS_SHAPES = {"small": (4096, 4096), "large": (8192, 28672)}  # representative (K, N) per shape class
# The fit against H200 run 1 (--fit, docs/kernels.md "Fit"): the model predicts the fused GEMM at 0.56x of
# its measured time for M > 128 (stalls it does not see), and cuBLAS / the dequantize kernel well. The
# crossover compares the GEMM at its fitted time, so a GEMM the model calls tensor-bound (= cuBLAS) is
# not picked over dequantize + cuBLAS (<= 1.06x cuBLAS) on the model's optimism. A GPU sweep replaces it.
FUSED_GEMM_FIT = 0.56


def crossover_table(devices, bits_list, capability=90, log=print):
    """Per (device, bits, shape class): the smallest M from which dequantize+cuBLAS is predicted faster than
    the fused GEMM at every larger M (the model's pick of each, the GEMM at its fitted time
    ``predicted / FUSED_GEMM_FIT``); ``gemv_max_m`` stays 16."""
    from llmq.kernels.crossover import FORMAT_VERSION
    table = {"version": FORMAT_VERSION, "devices": {}}
    rows = []
    for dev in devices:
        per_dev = table["devices"].setdefault(dev.name, {})
        for bits in bits_list:
            for cls, (k, n) in CLASS_SHAPES.items():
                wins = {}
                for m in CROSSOVER_MS:
                    recs = run([cost_cases.Workload(k, n, m, bits, 128)], dev, ["dequant-gemm", "dequant-scratch"],
                               capability, log=None)
                    best = {r.kernel: r.predicted_us for r in recs if r.picked}
                    gemm_fitted = best["gemm"] / FUSED_GEMM_FIT
                    wins[m] = best["scratch+cublas"] <= gemm_fitted
                    rows.append(dict(device=dev.name, bits=bits, shape_class=cls, shape=f"{k}x{n}", M=m, **best,
                                     gemm_fitted=gemm_fitted))
                scratch_min = next((m for m in CROSSOVER_MS if all(wins[x] for x in CROSSOVER_MS if x >= m)), 1 << 62)
                per_dev.setdefault(str(bits), {})[cls] = {"gemv_max_m": 16, "scratch_min_m": scratch_min,
                                                          "source": "predicted"}
                if log:
                    log(f"  {dev.name} int{bits} {cls}: dequantize+cuBLAS from M = {scratch_min}")
    table["devices"]["default"] = table["devices"][devices[0].name]
    return table, rows


def table(records, every=False) -> str:
    rows = [r for r in records if every or r.picked or r.error]
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = r.to_dict()
        if r.error:
            out.append(f"| {r.kernel} | {r.config} | {r.workload} | {r.shape} | {r.M} | ERROR {r.error[:100]} |")
            continue
        cells = [f"{d[c]:.2f}" if isinstance(d[c], float) else str(d[c]) for c in COLUMNS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_json(path, payload) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=1)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=sorted(DEVICES), default="h200")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[(8192, 8192), (8192, 28672)], metavar="KxN")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 16, 4096])
    ap.add_argument("--bits", nargs="+", type=int, default=[4], choices=[1, 2, 3, 4, 8])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--zeros", choices=["none", "int", "float"], default="none")
    ap.add_argument("--act", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--families", nargs="+", default=None, help=f"builders to run (default all: {sorted(cost_cases.BUILDERS)})")
    ap.add_argument("--capability", type=int, default=90, choices=[80, 90])
    ap.add_argument("--all", action="store_true", help="table: every autotune candidate, not just the model's pick")
    ap.add_argument("--out", default=None, help="JSON output (one record per kernel, config, shape, M)")
    ap.add_argument("--fit", action="store_true", help="compare the model with the H200 run 1 measurements")
    ap.add_argument("--moe", action="store_true", help="the grouped MoE kernel on Mixtral / Qwen3-MoE layer shapes, "
                    "--ms = tokens per decode step (cublas_fp16_us = the touched experts' fp16 weight at bandwidth)")
    ap.add_argument("--crossover", metavar="JSON", help="write the predicted crossover table (llmq/data/kernel_crossover.json "
                    "format) for --bits on h200 and h100 (default device: --device)")
    ap.add_argument("--kv", action="store_true", help="the quantized-KV decode kernel (kernels/kv_cost.py): fp16, "
                    "int8, int4, int2 KV on the 7B shape (32/32 heads, head_dim 128) at --kv-context, B = --kv-batch")
    ap.add_argument("--lut", action="store_true", help="the lookup-table kernels (kernels/lut_cost.py): bits 1-4 x "
                    "shared / per-column codebooks on --shapes at --ms, vs the uniform decode kernel's instr/code")
    ap.add_argument("--kv-batch", type=int, default=8)
    ap.add_argument("--kv-context", type=int, default=32768)
    a = ap.parse_args(argv)
    device = DEVICES[a.device]
    if 1 in a.bits and not a.lut:
        ap.error("--bits 1 exists only for the lookup-table kernels (--lut)")
    if a.lut:
        from llmq.kernels import lut_cost
        records = lut_cost.report(device, bits=sorted(set(a.bits) & {1, 2, 3, 4}) or [1, 2, 3, 4], shapes=a.shapes,
                                  ms=a.ms, group_size=a.group, act=a.act, capability=a.capability)
        print(lut_cost.table(records))
    elif a.kv:
        from llmq.kernels import kv_cost
        records = kv_cost.report(device, batch=a.kv_batch, context=a.kv_context, capability=a.capability)
        print(kv_cost.table(records))
    elif a.crossover:
        devs = [device] + [d for name, d in sorted(DEVICES.items()) if name != a.device]
        tab, rows = crossover_table(devs, a.bits, a.capability)
        write_json(a.crossover, tab)
        records = rows
    elif a.moe:
        from llmq.kernels.moe_cost import moe_records
        records = moe_records(device, tokens=a.ms, bits=a.bits, capability=a.capability)
        print(table(records, every=True))
    elif a.fit:
        from kernel_cost_fit import fit_report  # scripts/ is on sys.path when run as a script
        records, text = fit_report(device)
        print(text)
    else:
        workloads = [cost_cases.Workload(k, n, m, b, a.group, a.zeros, a.act)
                     for b in a.bits for k, n in a.shapes for m in a.ms]
        records = run(workloads, device, a.families, a.capability)
        print(table(records, a.all))
    if a.out:
        write_json(a.out, [r.to_dict() if hasattr(r, "to_dict") else r for r in records])
    return 0


if __name__ == "__main__":
    sys.exit(main())
