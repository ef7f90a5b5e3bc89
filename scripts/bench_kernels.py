"""Benchmark llmq's fused dequantize-matmul kernels.

On CUDA: times (``triton.testing.do_bench``, median ms) on the linear shapes of Llama-2-7B,
Llama-3-8B and Llama-2-70B, for every M in ``--ms``:

* ``llmq``        — ``llmq.kernels.dequant_matmul`` (decode split-K GEMV for M <= 16, tiled GEMM above)
* ``fp16``        — torch matmul on the fp16/bf16 weight (cuBLAS)
* ``deq+mm``      — dequantize the packed weight with torch, then matmul (the unfused path)
* ``torch-int4``  — ``torch.ops.aten._weight_int4pack_mm`` (tinygemm; 4-bit, bf16 activations)

and prints a table (time, TFLOP/s, effective GB/s, % of the device's memory bandwidth), writes
JSON (``--out``) and a plot of speedup over fp16 vs M (``--plot``). Every kernel output is checked
against the reference before it is timed.

On CPU (no CUDA): runs small shapes through the Triton interpreter and checks them against the
reference — correctness only, no timings (interpreter times say nothing about GPU speed).

    python scripts/bench_kernels.py                      # 4-bit g128 fp16, all models, all M
    python scripts/bench_kernels.py --bits 4 8 --models llama-2-70b --ms 1 16 4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

from tqdm import tqdm  # noqa: E402

from llmq.kernels.dequant_matmul import dequant_matmul, regime_for  # noqa: E402
from llmq.kernels.dequant_tile import dequant_matmul_reference, dequantize_reference, repack_tiled  # noqa: E402
from llmq.device_bandwidth import copy_bandwidth_gbs, nominal_peak_gbs  # noqa: E402
from llmq.quant.packing import pack  # noqa: E402

# (name, K, N) of each distinct linear; qkv / gate+up fused as inference engines run them
MODELS = {
    "llama-2-7b": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096)],
    "llama-3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama-2-70b": [("q/o", 8192, 8192), ("kv", 8192, 2048), ("up", 8192, 28672), ("down", 28672, 8192)],
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096, 8192]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GRAPHED = ("llmq", "fp16", "torch-int4")  # also timed as CUDA-graph replays
DEVICE = "cuda"  # the timed path; tests point it at the CPU interpreter to keep this code from rotting


def make_weight(k: int, n: int, bits: int, group: int, symmetric: bool, device: str, seed: int = 0,
                zero_point: str = "int"):
    """Random codes / scales / zeros in llmq's canonical layout (+ the tiled copy the kernels read);
    ``zero_point="float"``: fp16 zeros in [0, 2**bits - 1] (HQQ's form) instead of uint8."""
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, device=device, dtype=torch.int32)
    groups = -(-k // group)
    scales = (torch.rand(groups, n, generator=g, device=device) * 0.01 + 0.001).half()
    if symmetric:
        zeros = None
    elif zero_point == "float":
        zeros = (torch.rand(groups, n, generator=g, device=device) * ((1 << bits) - 1)).half()
    else:
        zeros = torch.randint(0, 1 << bits, (groups, n), generator=g, device=device, dtype=torch.int32).to(torch.uint8)
    qweight = pack(codes, bits)
    del codes
    return qweight, repack_tiled(qweight, bits, k), scales, zeros


def peak_gbs(name: str, override: float | None, copy_gbs: float) -> float:
    """Nominal peak DRAM bandwidth of the device (GB/s); the measured copy bandwidth if it is unknown."""
    return override or nominal_peak_gbs(name, copy_gbs)


def tinygemm_weight(k: int, n: int, group: int, device: str):
    """Random 4-bit weights in torch's tinygemm layout ``(w, scales_and_zeros)``, or ``(None, reason)``."""
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand(k // group, n, 2, device=device, dtype=torch.bfloat16) * 0.01
        torch.ops.aten._weight_int4pack_mm(torch.randn(1, k, device=device, dtype=torch.bfloat16), w, group, sz)
        return w, sz
    except Exception as e:  # noqa: BLE001 — report why, never hide it
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def bench_shape(args, bits, model, name, k, n, dev, peak, copy_gbs, dtype, timeit, timeit_graph) -> list[dict]:
    """Every method at every M on one (K, N) linear; a failing M is recorded and the others still run."""
    rows = []
    qweight, tiled, scales, zeros = make_weight(k, n, bits, args.group, args.sym, DEVICE,
                                                zero_point=args.zero_point)
    w16 = dequantize_reference(qweight, scales, zeros, bits, args.group, k).to(dtype)  # [K, N]
    wbytes = tiled.numel() * 4 + scales.numel() * 2 + (zeros.numel() * zeros.element_size() if zeros is not None else 0)
    tg_w, tg_sz = tinygemm_weight(k, n, args.group, DEVICE) if bits == 4 and args.sym else (None, None)
    if bits == 4 and args.sym and tg_w is None:
        tqdm.write(f"torch-int4 unavailable for K={k} N={n}: {tg_sz}")
    for m in args.ms:
        base = dict(device=dev, bits=bits, group=args.group, dtype=args.dtype, model=model, layer=name,
                    zero_point=None if args.sym else args.zero_point,
                    K=k, N=n, M=m, peak_gbs=peak, copy_gbs=copy_gbs)
        try:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            fns = {
                "llmq": (lambda: dequant_matmul(x, tiled, scales, zeros, None, bits, args.group, k), wbytes),
                "fp16": (lambda: x @ w16, k * n * 2),
                "deq+mm": (lambda: x @ dequantize_reference(qweight, scales, zeros, bits, args.group,
                                                             k).to(dtype), wbytes),
            }
            if m <= 16:  # the other regime, to measure the crossover
                fns["llmq-gemm"] = (lambda: dequant_matmul(x, tiled, scales, zeros, None, bits, args.group,
                                                           k, force="gemm"), wbytes)
            else:  # both prefill regimes whatever the table picks: the measured crossover (--crossover)
                fns["llmq-gemm"] = (lambda: dequant_matmul(x, tiled, scales, zeros, None, bits, args.group,
                                                           k, force="gemm"), wbytes)
                fns["llmq-scratch"] = (lambda: dequant_matmul(x, tiled, scales, zeros, None, bits, args.group,
                                                              k, force="scratch"), wbytes)
            if tg_w is not None:
                xb = x.to(torch.bfloat16)
                fns["torch-int4"] = (lambda: torch.ops.aten._weight_int4pack_mm(xb, tg_w, args.group, tg_sz),
                                     k * n // 2 + (k // args.group) * n * 4)
            if m <= 2048:  # every llmq output is checked against the reference before it is timed
                ref = (x.float() @ w16.float()).to(dtype)
                for method in ("llmq", "llmq-gemm", "llmq-scratch"):
                    if method in fns:
                        torch.testing.assert_close(fns[method][0](), ref, atol=5e-2, rtol=2e-2)
                del ref
            timings = [(method, fn, nbytes, timeit(fn)) for method, (fn, nbytes) in fns.items()]
            # CUDA-graph replay of the same calls: kernel time without Python / launch overhead, which
            # dominates small decode matmuls in eager mode (serving engines replay graphs)
            timings += [(f"{method} (graph)", fn, nbytes, timeit_graph(fn)) for method, (fn, nbytes) in fns.items()
                        if method in GRAPHED]
            for method, fn, nbytes, ms_ in timings:
                moved = nbytes + (m * k + m * n) * x.element_size()
                kind = method.removesuffix(" (graph)")
                rows.append(dict(base, method=method,
                                 regime=(regime_for(m, bits, k, n, x.device) if kind == "llmq"
                                         else kind.removeprefix("llmq-")),
                                 ms=ms_, tflops=2 * m * n * k / ms_ / 1e9, gbs=moved / ms_ / 1e6,
                                 pct_bw=100 * moved / ms_ / 1e6 / peak))
        except Exception as e:  # noqa: BLE001 — one failing case is reported, the rest still run
            tqdm.write(f"FAILED int{bits} {model} {name} M={m}: {type(e).__name__}: {str(e)[:300]}")
            rows.append(dict(base, method="llmq", error=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def bench_cuda(args) -> list[dict]:
    import triton.testing

    def timeit(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def timeit_graph(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")

    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    copy_gbs = copy_bandwidth_gbs(DEVICE)
    peak = peak_gbs(dev, args.peak_gbs, copy_gbs)
    print(f"{dev}: nominal peak {peak:.0f} GB/s, measured copy {copy_gbs:.0f} GB/s (read + write)")
    dtype = DTYPES[args.dtype]
    rows = []
    shapes = [(m, name, k, n) for m in args.models for name, k, n in MODELS[m]]
    for bits in args.bits:
        for model, name, k, n in tqdm(shapes, desc=f"int{bits}"):
            rows += bench_shape(args, bits, model, name, k, n, dev, peak, copy_gbs, dtype, timeit, timeit_graph)
            write_json(rows, args.out)  # after every shape: a run cut short keeps what it measured
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


def measured_crossover(rows: list[dict], device_key: str) -> dict:
    """A crossover table (``llmq/data/kernel_crossover.json`` format) with this run's measured entries for
    ``device_key`` merged over the shipped table: per (bits, shape class), ``scratch_min_m`` = the smallest
    M from which dequantize+cuBLAS beat the fused GEMM at every larger M measured (eager calls)."""
    import copy

    from llmq.kernels.crossover import load_table, shape_class

    table = copy.deepcopy(load_table())
    t = {(r["bits"], r["K"], r["N"], r["M"], r["method"]): r["ms"] for r in rows if "error" not in r}
    wins: dict[tuple, dict[int, bool]] = {}
    for (bits, k, n, m, method), ms_ in t.items():
        if method == "llmq-scratch" and (bits, k, n, m, "llmq-gemm") in t:
            key = (bits, shape_class(k, n))
            won = ms_ <= t[(bits, k, n, m, "llmq-gemm")]
            wins.setdefault(key, {})[m] = wins.get(key, {}).get(m, True) and won  # every shape of the class
    for (bits, cls), by_m in wins.items():
        ms_sorted = sorted(by_m)
        first = next((m for m in ms_sorted if all(by_m[x] for x in ms_sorted if x >= m)), 1 << 62)
        table["devices"].setdefault(device_key, {}).setdefault(str(bits), {})[cls] = {
            "gemv_max_m": 16, "scratch_min_m": first, "source": "measured"}
    return table


def write_json(rows: list[dict], path: str) -> None:
    """Atomically (write + rename) save the rows so far."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def summarize_targets(rows: list[dict]) -> None:
    """The issue's targets (4-bit g128 fp16 on an H100), checked against this run."""
    ok = [r for r in rows if "error" not in r]
    t = {(r["bits"], r["K"], r["N"], r["M"], r["method"]): r for r in ok}

    def speed(bits, k, n, m, method="llmq", over="fp16"):
        a, b = t.get((bits, k, n, m, method)), t.get((bits, k, n, m, over))
        return (b["ms"] / a["ms"]) if a and b else None

    print("\nTargets (speed-up = fp16 time / llmq time; kernel = CUDA-graph replays, eager = plain calls):")
    for bits, m, goal in ((4, 1, 3.0), (4, 16, 2.5), (4, 4096, 0.9), (8, 1, 1.8)):
        for k, n in ((8192, 8192), (8192, 28672), (4096, 4096), (4096, 12288)):
            s_graph = speed(bits, k, n, m, "llmq (graph)", "fp16 (graph)")
            s_eager = speed(bits, k, n, m)
            if s_eager is None:
                continue
            best = s_graph if s_graph is not None else s_eager
            bw = t[(bits, k, n, m, "llmq (graph)" if s_graph is not None else "llmq")]["pct_bw"]
            graph = f"kernel {s_graph:5.2f}x" if s_graph is not None else "kernel   n/a"
            print(f"  int{bits} M={m:<5} {k}x{n:<6} {graph}, eager {s_eager:5.2f}x fp16 (goal >= {goal}x) "
                  f"{'MET' if best >= goal else 'missed'}; {bw:.0f}% of peak bandwidth")
    graphed = any(r["method"] == "torch-int4 (graph)" for r in ok)
    ours, theirs = ("llmq (graph)", "torch-int4 (graph)") if graphed else ("llmq", "torch-int4")
    vs_tinygemm = [(r["model"], r["layer"], r["M"], speed(r["bits"], r["K"], r["N"], r["M"], ours, theirs))
                   for r in ok if r["method"] == ours]
    vs_tinygemm = [v for v in vs_tinygemm if v[3] is not None]
    slower = [v[:3] for v in vs_tinygemm if v[3] < 1.0]
    if vs_tinygemm:
        print(f"  faster than torch-int4 (tinygemm, {ours}) in {len(vs_tinygemm) - len(slower)}/{len(vs_tinygemm)} cases; "
              f"slower at: {slower[:20]}")


def baseline_ms(rows: list[dict]) -> dict:
    """fp16 time per (bits, model, layer, M, graphed): eager rows compare with eager fp16, graph rows with graph."""
    return {(r["bits"], r["model"], r["layer"], r["M"], r["method"].endswith("(graph)")): r["ms"] for r in rows
            if r["method"].removesuffix(" (graph)") == "fp16"}


def print_table(rows: list[dict]) -> None:
    rows = [r for r in rows if "error" not in r]
    base = baseline_ms(rows)
    print(f"{'bits':>4} {'model':<12} {'layer':<8} {'K':>6} {'N':>6} {'M':>5} {'method':<10} {'ms':>9} "
          f"{'TFLOP/s':>8} {'GB/s':>7} {'%BW':>5} {'vs fp16':>7}")
    for r in rows:
        speed = base[(r["bits"], r["model"], r["layer"], r["M"], r["method"].endswith("(graph)"))] / r["ms"]
        print(f"{r['bits']:>4} {r['model']:<12} {r['layer']:<8} {r['K']:>6} {r['N']:>6} {r['M']:>5} "
              f"{r['method']:<10} {r['ms']:>9.4f} {r['tflops']:>8.1f} {r['gbs']:>7.0f} {r['pct_bw']:>5.1f} "
              f"{speed:>6.2f}x")


def plot(rows: list[dict], path: str) -> None:
    """Speed-up over fp16 vs M, one panel per model: llmq and tinygemm, eager and CUDA-graph replays."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "error" not in r]
    base = baseline_ms(rows)
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        keys = sorted({(r["bits"], r["layer"], r["method"]) for r in rows if r["model"] == model and
                       r["method"].removesuffix(" (graph)") in ("llmq", "torch-int4")})
        for bits, layer, method in keys:
            pts = sorted((r["M"], base[(bits, model, layer, r["M"], method.endswith("(graph)"))] / r["ms"])
                         for r in rows if (r["bits"], r["model"], r["layer"], r["method"]) == (bits, model, layer,
                                                                                                method))
            ax.plot(*zip(*pts), marker="o", lw=1, ls="-" if "graph" in method else ":",
                    label=f"int{bits} {layer} {method}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="speed-up over fp16 matmul", title=model)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"llmq dequantize-matmul, {rows[0]['device']} (graph: CUDA-graph replay vs fp16 replay)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_cpu() -> None:
    """Interpreter run on small shapes: correctness only."""
    print("No CUDA device: running small shapes through the Triton interpreter (TRITON_INTERPRET=1) "
          "for CORRECTNESS ONLY — no timings are reported.")
    cases = [(bits, m, dt, zp) for bits in (2, 3, 4, 8) for m in (1, 16, 17, 64) for dt in (torch.float16, torch.float32)
             for zp in ("int", "float")]
    for bits, m, dt, zp in tqdm(cases, desc="interpreter check"):
        k, n, group = 256, 96, 128
        qweight, tiled, scales, zeros = make_weight(k, n, bits, group, symmetric=False, device="cpu", zero_point=zp)
        x = torch.randn(m, k, dtype=dt)
        y = dequant_matmul(x, tiled, scales, zeros, None, bits, group, k)
        ref = dequant_matmul_reference(x, qweight, scales, zeros, None, bits, group, k)
        torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)
    print(f"OK: {len(cases)} interpreter runs (bits 2/3/4/8, M 1/16/17/64, fp16/fp32, uint8/float zeros, K={k}, "
          f"N={n}, g{group}) "
          "match the pure-torch reference.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4], choices=[2, 3, 4, 8])
    p.add_argument("--group", type=int, default=128, choices=[32, 64, 128, 256])
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weights (default symmetric)")
    p.add_argument("--zero-point", choices=["int", "float"], default="int",
                   help="with --asym: uint8 zeros (GPTQ/AWQ) or fp16 float zeros (HQQ)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth (GB/s) override")
    p.add_argument("--out", default="bench_kernels.json")
    p.add_argument("--plot", default="bench_kernels.png")
    p.add_argument("--crossover", default=None, metavar="JSON",
                   help="write the crossover table with this GPU's measured entries (copy it to llmq/data/kernel_crossover.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        check_cpu()
        return 0
    rows = bench_cuda(args)
    if args.crossover:
        from llmq.kernels.crossover import device_key
        write_json(measured_crossover(rows, device_key(torch.device("cuda"))), args.crossover)
    print_table(rows)
    plot(rows, args.plot)
    summarize_targets(rows)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
