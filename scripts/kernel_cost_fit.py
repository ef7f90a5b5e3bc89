"""The cost model against every H200 weight-kernel measurement of BENCHMARKS.md (run 1).

Run 1 timed the kernels of commit ``13aeee5``, so the fit compiles *those* kernels: their files are
read from git (``git show``), written to a temporary package ``llmq_run1`` (imports of
``llmq.kernels`` rewritten to it), and launched with that version's rules (32-column decode tiles,
split-K for ~4 programs per SM, the GEMM for M > 16). Every ``llmq`` / ``llmq-gemm`` row of
``docs/benchmarks/h200-2026-11-26/run1/bench_kernels_int{4,8}.json`` becomes one case; the report
gives predicted / measured per case and per (regime, M range). Used by ``kernel_cost.py --fit``.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import types

import torch

from llmq.kernels.cost_cases import Case, Workload, evaluate, mark_picks
from llmq.kernels.sass import MockPointer

COMMIT = "13aeee5"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN1 = os.path.join(ROOT, "docs", "benchmarks", "h200-2026-11-26", "run1")
FILES = ("_launch.py", "interpreter.py", "dequant_tile.py", "dequant_gemv.py", "dequant_gemm.py")


def load_run1():
    """``(gemv module, gemm module)`` of commit 13aeee5, importable beside today's kernels."""
    d = tempfile.mkdtemp(prefix="llmq_run1_")
    for f in FILES:
        try:
            src = subprocess.run(["git", "-C", ROOT, "show", f"{COMMIT}:kernels/{f}"], capture_output=True,
                                 text=True, check=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            raise RuntimeError(f"--fit needs git and commit {COMMIT} (the kernels run 1 timed) in {ROOT}: "
                               "fetch the full history") from e
        with open(os.path.join(d, f), "w") as fh:
            fh.write(src.replace("llmq.kernels.", "llmq_run1."))
    pkg = types.ModuleType("llmq_run1")
    pkg.__path__ = [d]
    sys.modules["llmq_run1"] = pkg
    return importlib.import_module("llmq_run1.dequant_gemv"), importlib.import_module("llmq_run1.dequant_gemm")


def _pointers(act, out):
    return dict(x_ptr=MockPointer(act), qw_ptr=MockPointer(torch.int32), s_ptr=MockPointer(torch.float16),
                z_ptr=MockPointer(torch.float16), b_ptr=MockPointer(torch.float16), out_ptr=MockPointer(out))


def run1_cases(g, m_mod, w: Workload, regime: str):
    """Cases of run 1's kernels for workload ``w`` in ``regime`` (``gemv`` or ``gemm``), as its launchers
    launched them (symmetric, no bias, fp16 activations: what bench_kernels.py timed)."""
    p = 32 // w.bits if w.bits != 3 else 10
    n_tiles = -(-w.k // (16 * p))
    common = dict(K=w.k, N=w.n, M=w.m, group_size=w.group_size, num_groups=-(-w.k // w.group_size),
                  stride_xm=w.k, BITS=w.bits, P=p, TILE=16, HAS_ZEROS=False, HAS_BIAS=False, FP32_DOT=False)
    if regime == "gemv":
        bn = g.DECODE_BLOCK_N
        want = -(-g.PROGRAMS_PER_SM * 132 // -(-w.n // bn))
        split = max(1, min(want, n_tiles // 2))
        tps = -(-n_tiles // split)
        split = -(-n_tiles // tps)
        block_m = 1 if w.m == 1 else 16
        args = {**_pointers(torch.float16, torch.float32 if split > 1 else torch.float16), **common,
                "tiles_per_split": tps, "stride_om": w.n, "ATOMIC": split > 1, "BLOCK_M": block_m, "BLOCK_N": bn}
        grid = -(-w.n // bn) * split
        extra = 2 if split > 1 else 0
        for warps, stages in g.GPU_CONFIGS["fma" if block_m == 1 else "dot"]:
            yield Case("run1", "gemv", f"w{warps}s{stages}", w, g.dequant_gemv_kernel, args, warps, stages, grid, tps,
                       16 * p * bn, w.weight_bytes() + w.io_bytes() + 12 * w.m * w.n * (split > 1),
                       2 * w.m * w.n * w.k, 1 + extra)
    else:
        for bm, bn, warps, stages in m_mod.GPU_CONFIGS:
            args = {**_pointers(torch.float16, torch.float16), **common, "m_bucket": 1 << (w.m - 1).bit_length(),
                    "stride_om": w.n, "GROUP_M": m_mod.GROUP_M, "BLOCK_M": bm, "BLOCK_N": bn}
            yield Case("run1", "gemm", f"{bm}x{bn} w{warps}s{stages}", w, m_mod.dequant_gemm_kernel, args, warps,
                       stages, -(-w.m // bm) * -(-w.n // bn), n_tiles * p, 16 * bn, w.weight_bytes() + w.io_bytes(),
                       2 * w.m * w.n * w.k)


def measurements():
    """Run 1's llmq rows: (bits, K, N, M, regime, measured µs)."""
    rows = []
    for bits in (4, 8):
        path = os.path.join(RUN1, f"bench_kernels_int{bits}.json")
        for r in json.load(open(path)):
            if r.get("method") in ("llmq", "llmq-gemm") and "ms" in r:
                regime = "gemm" if r["method"] == "llmq-gemm" or r["M"] > 16 else "gemv"
                rows.append((bits, r["K"], r["N"], r["M"], regime, r["ms"] * 1e3))
    return rows


def fit_report(device):
    """``(rows, markdown)``: per measured case, the model's pick for run 1's kernel vs the measured time."""
    g, m_mod = load_run1()
    rows = []
    for bits, k, n, m, regime, meas in measurements():
        w = Workload(k, n, m, bits, 128)
        recs = [evaluate(c, device) for c in run1_cases(g, m_mod, w, regime)]
        mark_picks(recs)
        best = next(r for r in recs if r.picked)
        rows.append(dict(bits=bits, shape=f"{k}x{n}", M=m, regime=regime, config=best.config,
                         instr_per_code=round(best.instr_per_code, 2), predicted_us=round(best.predicted_us, 1),
                         measured_us=round(meas, 1), ratio=round(best.predicted_us / meas, 3), bound=best.bound))
    lines = ["| bits | shape | M | regime | config | instr/code | predicted µs | measured µs | pred/meas | bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['shape']} | {r['M']} | {r['regime']} | {r['config']} | {r['instr_per_code']} | "
              f"{r['predicted_us']} | {r['measured_us']} | {r['ratio']} | {r['bound']} |" for r in rows]
    lines += ["", "| group | cases | median pred/meas | min | max |", "|---|---|---|---|---|"]
    groups: dict[str, list[float]] = {}
    for r in rows:
        size = "large" if int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) >= 8192 * 8192 else "small"
        band = "M=1" if r["M"] == 1 else "M<=16" if r["M"] <= 16 else "M<=128" if r["M"] <= 128 else "M>128"
        groups.setdefault(f"int{r['bits']} {r['regime']} {band} {size}", []).append(r["ratio"])
    for name, v in sorted(groups.items()):
        lines.append(f"| {name} | {len(v)} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")
    return rows, "\n".join(lines)
