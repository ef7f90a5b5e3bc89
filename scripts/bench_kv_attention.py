"""Benchmark the quantized-KV decode-attention kernel at long context.

On CUDA, for Llama-2-7B-shaped (32 query / 32 KV heads) and Llama-3-8B-shaped (32 / 8, GQA)
attention with head_dim 128, contexts ``--contexts`` and batches ``--batches``, times one decode step
(``triton.testing.do_bench``, median) of

* ``llmq-int8/4/2`` — ``llmq.kernels.kv_attention.kv_decode_attention`` over a packed cache
  (per-channel keys, per-token values, asymmetric, group 64, a 128-token fp16 residual window);
* ``llmq-fp16``     — the same kernel with every token in the fp16 residual (a flash-decoding baseline);
* ``sdpa-fp16``     — ``torch.nn.functional.scaled_dot_product_attention`` on the fp16 cache.

For each it reports the bytes one step must read (codes + scales + zeros + residual + q/out), the
achieved GB/s and its percentage of the device's nominal peak and of a measured device-to-device copy.
Every llmq output is checked against the pure-torch reference first. ``--sweep`` also times the
kernel's launch options (warps, stages) for int4 at the largest context. Writes JSON and a plot.

Without CUDA it runs small shapes through the Triton interpreter for correctness only and says so.

    python scripts/bench_kv_attention.py --out results/bench_kv_attention
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

from llmq.device_bandwidth import copy_bandwidth_gbs, nominal_peak_gbs  # noqa: E402
from llmq.kernels.kv_attention import PackedKV, kv_decode_attention, kv_decode_attention_reference  # noqa: E402

SHAPES = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # (q heads, kv heads, head_dim)
GROUP, RESIDUAL = 64, 128


def random_cache(b: int, hkv: int, t: int, d: int, bits: int | None, device: str, dtype=torch.float16) -> PackedKV:
    """A packed cache of ``t`` tokens (``bits=None``: all of them in the fp16 residual window)."""
    if bits is None:
        k = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
        empty = torch.zeros(b, hkv, 0, d, device=device, dtype=torch.int32)
        s = torch.zeros(b, hkv, 0, 1, device=device, dtype=torch.float16)  # nothing quantized: one group per token
        return PackedKV(empty, s, None, empty, s, None, 0, k, v, 4, d, False, True)
    n_q, group = t - RESIDUAL, min(GROUP, d)
    p = 32 // bits
    gen = torch.Generator(device=device).manual_seed(0)

    def codes():
        return torch.randint(-2**31, 2**31 - 1, (b, hkv, n_q // p, d), generator=gen, device=device,
                             dtype=torch.int32)  # packed along the tokens (llmq.quant.kv)

    def scales(*shape):
        return (torch.rand(*shape, generator=gen, device=device) * 0.02 + 0.005).half()

    def zeros(*shape):
        return torch.randint(0, 1 << bits, shape, generator=gen, device=device, dtype=torch.uint8)

    kshape, vshape = (b, hkv, n_q // group, d), (b, hkv, n_q, d // group)  # per-channel keys, per-token values
    return PackedKV(codes(), scales(*kshape), zeros(*kshape), codes(), scales(*vshape), zeros(*vshape), n_q,
                    torch.randn(b, hkv, RESIDUAL, d, device=device, dtype=dtype),
                    torch.randn(b, hkv, RESIDUAL, d, device=device, dtype=dtype), bits, group, True, False)


def bytes_read(kv: PackedKV) -> int:
    """Bytes one decode step must read from the cache (valid tokens only)."""
    n = kv.n_quant
    total = 0
    key_rows = n // kv.group_size if kv.key_per_channel else n  # per-channel keys: a scale row per group
    word_rows = n // (32 // kv.bits)  # codes packed along the tokens
    for t, rows in ((kv.k_codes, word_rows), (kv.v_codes, word_rows), (kv.v_scales, n), (kv.v_zeros, n), (kv.k_scales, key_rows),
                    (kv.k_zeros, key_rows)):
        if t is not None:
            total += t[:, :, :rows].numel() * t.element_size()
    return total + 2 * kv.k_res.numel() * kv.k_res.element_size()


def check(q, kv, **launch) -> None:
    ref = kv_decode_attention_reference(q, kv, q.shape[-1] ** -0.5)
    out = kv_decode_attention(q, kv, q.shape[-1] ** -0.5, **launch)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)


def bench_cuda(args) -> dict:
    import triton.testing

    def timeit(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    peak = nominal_peak_gbs(dev, copy_gbs)
    print(f"{dev}: nominal peak {peak} GB/s, measured copy {copy_gbs:.0f} GB/s")
    rows = []
    print(f"{'model':<11} {'B':>3} {'T':>6} {'method':<10} {'ms':>8} {'MB read':>9} {'GB/s':>6} {'%peak':>6} "
          f"{'%copy':>6} {'vs sdpa':>7}")
    for model, (hq, hkv, d) in SHAPES.items():
        for t in args.contexts:
            for b in args.batches:
                q = torch.randn(b, hq, d, device="cuda", dtype=torch.float16)
                sdpa_ms = None
                for method in ["sdpa-fp16", "llmq-fp16"] + [f"llmq-int{bits}" for bits in args.bits]:
                    try:
                        bits = int(method.removeprefix("llmq-int")) if "int" in method else None
                        kv = random_cache(b, hkv, t, d, bits, "cuda")
                        if method == "sdpa-fp16":
                            q4, k, v = q[:, :, None], kv.k_res, kv.v_res
                            fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                                q4, k, v, enable_gqa=hq != hkv)
                        else:
                            if t <= 32768:
                                check(q, kv)
                            fn = lambda: kv_decode_attention(q, kv, d ** -0.5)  # noqa: E731
                        ms = timeit(fn)
                        nbytes = bytes_read(kv) + 2 * q.numel() * 2
                        sdpa_ms = ms if method == "sdpa-fp16" else sdpa_ms
                        row = dict(device=dev, model=model, q_heads=hq, kv_heads=hkv, head_dim=d, context=t, batch=b,
                                   method=method, ms=ms, bytes=nbytes, gbs=nbytes / ms / 1e6,
                                   pct_peak=100 * nbytes / ms / 1e6 / peak, pct_copy=100 * nbytes / ms / 1e6 / copy_gbs,
                                   speedup_vs_sdpa=sdpa_ms / ms if sdpa_ms else None)
                        rows.append(row)
                        print(f"{model:<11} {b:>3} {t:>6} {method:<10} {ms:8.4f} {nbytes / 1e6:9.1f} {row['gbs']:6.0f} "
                              f"{row['pct_peak']:6.1f} {row['pct_copy']:6.1f} "
                              f"{(row['speedup_vs_sdpa'] or float('nan')):6.2f}x", flush=True)
                    except Exception as e:  # noqa: BLE001 — report and go on with the other cases
                        print(f"FAILED {model} B={b} T={t} {method}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        rows.append(dict(model=model, context=t, batch=b, method=method, error=str(e)[:300]))
                    finally:
                        kv = None
                        torch.cuda.empty_cache()
    sweep = []
    if args.sweep:
        t, b = max(args.contexts), max(args.batches)
        for model, (hq, hkv, d) in SHAPES.items():
            kv = random_cache(b, hkv, t, d, 4, "cuda")
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.float16)
            # the residual window is 128 of t tokens, so block_n (its step) barely matters: the quantized
            # loop's options are swept (warps, stages)
            for warps in (4, 8):
                for stages in (2, 3):
                    launch = dict(num_warps=warps, num_stages=stages)
                    try:
                        check(q, kv, **launch)
                        ms = timeit(lambda: kv_decode_attention(q, kv, d ** -0.5, **launch))
                        gbs = (bytes_read(kv) + 4 * q.numel()) / ms / 1e6
                        sweep.append(dict(model=model, context=t, batch=b, **launch, ms=ms, gbs=gbs,
                                          pct_peak=100 * gbs / peak))
                        print(f"sweep int4 {model} B={b} T={t} {launch}: {ms:.4f} ms {gbs:.0f} GB/s "
                              f"({100 * gbs / peak:.0f}% of peak)", flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"sweep FAILED {launch}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            kv = None
            torch.cuda.empty_cache()
    return dict(device=dev, peak_gbs=peak, copy_gbs=copy_gbs, rows=rows, sweep=sweep)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(6 * len(SHAPES), 4), squeeze=False)
    for ax, model in zip(axes[0], SHAPES):
        b = max(r["batch"] for r in rows)
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["context"], r["gbs"]) for r in rows if r["model"] == model and r["method"] == method
                         and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.axhline(report["peak_gbs"], color="k", lw=0.8, ls="--", label="nominal peak")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="GB/s read", title=f"{model}, batch {b}")
        ax.legend(fontsize=7)
    fig.suptitle(f"decode attention over the KV cache — {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_cpu() -> int:
    print("No CUDA device: checking the kernel against the reference in the Triton interpreter "
          "(TRITON_INTERPRET=1), CORRECTNESS ONLY — no timings are reported.")
    for bits in (None, 8, 4, 2):
        for hq, hkv in ((4, 4), (8, 2)):
            kv = random_cache(2, hkv, 384, 32, bits, "cpu", torch.float32)
            q = torch.randn(2, hq, 32)
            check(q, kv, num_splits=3)
    print("OK: fp16-residual / int8 / int4 / int2 caches, MHA and GQA, match the reference.")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], choices=[8, 4, 2])
    p.add_argument("--sweep", action="store_true", help="also time the launch options (warps / stages) for int4")
    p.add_argument("--out", default="results/bench_kv_attention")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        return check_cpu()
    report = bench_cuda(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
