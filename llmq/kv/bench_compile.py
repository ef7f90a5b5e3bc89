"""``llmq bench --compile``: end-to-end prefill and decode with static caches and a compiled decode step.

For every (weights, KV cache, context) it prefills ``context`` random tokens eagerly (transformers
never compiles prefill either), then times ``--new-tokens`` greedy decode steps of a
``torch.compile(fullgraph=True)``-compiled forward over a static cache:

* KV ``fp``: transformers' ``StaticCache`` (model dtype) with sdpa;
* KV ``8``/``4``/``2``: ``llmq.QuantizedStaticCache`` with llmq's decode attention (the Triton
  kernel on CUDA, the pure-torch reference on CPU).

On CUDA the backend is inductor with ``mode="reduce-overhead"`` (CUDA graphs) and the model a
Llama-7B-shaped random fp16 model (``llmq.kv.bench.build_model``); every configuration also
gets the eager ``DynamicCache`` fp16 decode rate of the same model (``llmq.kv.bench.run_one``),
the baseline of the ``vs eager fp`` column. Then the largest batch that fits
``--memory-budget-gb`` is computed from measured bytes (the batch-1 run's allocated cache bytes
per sequence and its peak minus that cache), run with the prefilled sequence copied to every row,
and stepped down on OOM or a measured peak over budget.

On CPU (no GPU) it runs the small model (fp32) with inductor as well, without CUDA graphs: the cpu
backend's int4 / int8 kernels lower into the compiled graph (``llmq.nn.cpu_backend``), so the rows
are the CPU's compiled decode speed (docs/cpu_backend.md); they say nothing about GPU speed.
``--compile-backend eager`` only checks the graph plumbing, quickly. Every row counts graphs
(``graphs``, ``graph_breaks``, ``recompiles`` during the timed steps). The largest batch is computed only.

Writes ``bench_compile.json`` (after every run) and ``bench_compile.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from llmq.kv.bench import build_model, run_one


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_static_cache(model, kv: str, max_len: int, residual: int, group: int):
    """``StaticCache`` for ``fp``, else ``QuantizedStaticCache`` with ``kv`` bits."""
    from transformers import StaticCache

    from llmq.kv import QuantizedStaticCache

    if kv == "fp":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return QuantizedStaticCache(model.config, max_cache_len=max_len, bits=int(kv), residual_length=residual,
                                group_size=group)


_STATE = ("k_codes", "v_codes", "k_scales", "v_scales", "k_zeros", "v_zeros", "keys", "values", "n_quant",
          "cumulative_length")


def replicate_rows(src, dst) -> None:
    """Copy a prefilled batch-1 static cache into every row of an initialized batch-B one (in place, so
    the destination keeps its static addresses)."""
    for s, d in zip(src.layers, dst.layers):
        for name in _STATE:
            a, b = getattr(s, name, None), getattr(d, name, None)
            if a is not None and b is not None:
                b.copy_(a.expand_as(b) if a.dim() else a)


def cache_bytes(cache) -> int:
    """Allocated bytes of a static cache (what a sequence costs at this ``max_cache_len``)."""
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for layer in cache.layers
               for n in _STATE[:8] if getattr(layer, n, None) is not None)


@torch.no_grad()
def run_compiled(model, kv: str, context: int, batch: int, new_tokens: int, args, backend: str,
                 mode: str | None) -> dict:
    """Eager prefill of one sequence (copied to ``batch`` rows), then ``new_tokens`` timed compiled steps."""
    from torch._dynamo.utils import counters

    from llmq.kv import cache_kwarg

    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    warm = 3
    max_len = context + new_tokens + warm + 1
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    one = make_static_cache(model, kv, max_len, args.residual, args.group)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: one}).logits
    _sync(device)
    prefill_s = time.perf_counter() - t0
    nxt = logits[:, -1:].argmax(-1).repeat(batch, 1)
    del logits
    cache = one
    if batch > 1:
        cache = make_static_cache(model, kv, max_len, args.residual, args.group)
        layer0 = one.layers[0]
        cache.early_initialization(batch, layer0.keys.shape[1], layer0.keys.shape[-1], layer0.keys.dtype, device)
        replicate_rows(one, cache)
        del one
    torch._dynamo.reset()
    counters.clear()

    def step(x):
        return model(input_ids=x, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

    compiled = torch.compile(step, backend=backend, mode=mode, fullgraph=True)

    def call(x):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each step's outputs may be overwritten by the next
        return compiled(x).clone()

    t0 = time.perf_counter()
    nxt = call(nxt)
    _sync(device)
    compile_s = time.perf_counter() - t0
    for _ in range(warm - 1):  # CUDA graph recording happens on the first calls after compiling
        nxt = call(nxt)
    _sync(device)
    graphs_before = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = call(nxt)
    _sync(device)
    decode_s = time.perf_counter() - t0
    out = dict(kv=kv, context=context, batch=batch, new_tokens=new_tokens, mode="compile", backend=backend,
               compile_mode=mode, prefill_tokens_per_s=context / prefill_s, decode_tokens_per_s=batch * new_tokens
               / decode_s, prefill_s=prefill_s, decode_s=decode_s, first_step_s=compile_s,
               graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
               recompiles_while_timed=counters["stats"]["unique_graphs"] - graphs_before,
               kv_bytes_allocated=cache_bytes(cache), max_cache_len=max_len)
    if hasattr(cache, "memory"):
        out["kv_bytes_used"] = cache.memory().used_bytes
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del cache, compiled
    gc.collect()
    return out


def largest_batch(model, kv, context, one: dict, new_tokens: int, args, backend, mode, weight_bytes: int):
    """``(batch, measured run or None, how)``: the largest batch in the budget, from measured bytes."""
    cuda = torch.cuda.is_available()
    per_seq = one["kv_bytes_allocated"]
    if not cuda:
        budget = (args.memory_budget_gb or 16) * 2**30
        return (int(max(0, budget - weight_bytes) // per_seq), None,
                f"computed: (budget - weights) / allocated cache bytes per sequence, budget {budget / 2**30:g} GiB")
    budget = args.memory_budget_gb * 2**30 if args.memory_budget_gb else torch.cuda.get_device_properties(
        0).total_memory
    best = min(int((budget - (one["peak_bytes"] - per_seq)) // per_seq), args.max_batch)
    how = (f"computed from the batch-1 run's bytes against a {args.memory_budget_gb or 'whole-GPU'} GB budget, "
           f"then run, stepped down on OOM / over budget")
    while best >= 1:
        try:
            r = run_compiled(model, kv, context, best, new_tokens, args, backend, mode)
            if r["peak_bytes"] <= budget:
                return best, r, how
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        best -= max(1, best // 10)
    return 0, None, how


def run(args: argparse.Namespace) -> int:
    from llmq.kv import enable_fused_attention

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = args.compile_backend or "inductor"
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    model_name = args.model or ("llama-7b-random" if cuda else "smollm2-135m")
    contexts = args.contexts or ([1024, 8192, 32768] if cuda else [256])
    new_tokens = args.new_tokens or (64 if cuda else 8)
    dtype = torch.float16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'unknown'})"
    if not cuda:
        print(f"No CUDA GPU: --compile runs {model_name} on CPU with the {backend!r} backend (no CUDA graphs); "
              f"these numbers are the CPU's and say nothing about GPU speed.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, largest = [], []

    def save() -> None:
        report = dict(device=device_name, model=model_name, dtype=str(dtype), backend=backend, compile_mode=mode,
                      new_tokens=new_tokens, residual=args.residual, group=args.group,
                      memory_budget_gb=args.memory_budget_gb, runs=results, largest_batch=largest)
        tmp = out_dir / "bench_compile.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out_dir / "bench_compile.json")
        return report

    for weights in args.weights:
        model, weight_bytes = build_model(model_name, weights, device, dtype)
        enable_fused_attention(model)
        for context in contexts:  # the eager fp16 baseline: DynamicCache, no compile
            r = run_one(model, "fp", context, 1, new_tokens, args.residual, args.group)
            r.update(weights=weights, weight_bytes=weight_bytes, mode="eager")
            results.append(r)
            save()
            print(json.dumps(r))
        for kv in args.kv:
            for context in contexts:
                try:
                    r = run_compiled(model, kv, context, 1, new_tokens, args, backend, mode)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    r = dict(kv=kv, context=context, batch=1, mode="compile", oom=True)
                r.update(weights=weights, weight_bytes=weight_bytes)
                results.append(r)
                save()
                print(json.dumps(r))
                if args.no_batch_search or r.get("oom"):
                    continue
                best, at_best, how = largest_batch(model, kv, context, r, new_tokens, args, backend, mode,
                                                   weight_bytes)
                row = dict(weights=weights, kv=kv, context=context, largest_batch=best, how=how)
                if at_best is not None:
                    row.update({k: at_best[k] for k in ("decode_tokens_per_s", "peak_bytes", "graphs",
                                                        "recompiles_while_timed")})
                largest.append(row)
                save()
                print(json.dumps(row))
        del model
        gc.collect()
    report = save()
    plot(report, out_dir / "bench_compile.png")
    print_table(report)
    print(f"wrote {out_dir / 'bench_compile.json'} and {out_dir / 'bench_compile.png'}")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['model']} on {report['device']}, torch.compile backend {report['backend']} "
          f"(mode {report['compile_mode']}), {report['new_tokens']} decode steps, batch 1")
    eager = {(r["weights"], r["context"]): r["decode_tokens_per_s"] for r in report["runs"] if r["mode"] == "eager"}
    print("| weights | KV | context | prefill tok/s | decode tok/s | vs eager fp | graphs | breaks | "
          "recompiles (timed) | KV MiB allocated |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        if r.get("oom"):
            print(f"| {r['weights']} | {r['kv']} | {r['context']} | OOM | OOM | – | – | – | – | – |")
            continue
        if r["mode"] == "eager":
            print(f"| {r['weights']} | fp (eager, DynamicCache) | {r['context']} | {r['prefill_tokens_per_s']:.1f} | "
                  f"{r['decode_tokens_per_s']:.2f} | 1.00x | – | – | – | {r['kv_bytes'] / 2**20:.2f} |")
            continue
        base = eager.get((r["weights"], r["context"]))
        print(f"| {r['weights']} | {r['kv']} | {r['context']} | {r['prefill_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.2f} | {r['decode_tokens_per_s'] / base:.2f}x | {r['graphs']} | "
              f"{r['graph_breaks']} | {r['recompiles_while_timed']} | {r['kv_bytes_allocated'] / 2**20:.2f} |")
    if report["largest_batch"]:
        print(f"\nLargest batch in the memory budget ({report['memory_budget_gb'] or 'default'} GB):")
        print("| weights | KV | context | largest batch | decode tok/s | vs fp KV | how |")
        print("|---|---|---|---|---|---|---|")
        fp = {(r["weights"], r["context"]): r.get("decode_tokens_per_s") for r in report["largest_batch"]
              if r["kv"] == "fp"}
        for r in report["largest_batch"]:
            tps, base = r.get("decode_tokens_per_s"), fp.get((r["weights"], r["context"]))
            ratio = f"{tps / base:.2f}x" if tps and base else "–"
            print(f"| {r['weights']} | {r['kv']} | {r['context']} | {r['largest_batch']} | "
                  f"{f'{tps:.1f}' if tps else '–'} | {ratio} | {r['how']} |")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if not r.get("oom")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["weights"], r["kv"], r["mode"]) for r in runs}):
        rows = sorted((r for r in runs if (r["weights"], r["kv"], r["mode"]) == key), key=lambda r: r["context"])
        label = f"W:{key[0]} KV:{key[1]} {key[2]}"
        style = "o--" if key[2] == "eager" else "o-"
        axes[0].plot([r["context"] for r in rows], [r["decode_tokens_per_s"] for r in rows], style, label=label)
        axes[1].plot([r["context"] for r in rows], [r["prefill_tokens_per_s"] for r in rows], style, label=label)
    axes[0].set(xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)", xscale="log")
    axes[1].set(xlabel="context (tokens)", ylabel="prefill tokens/s (batch 1)", xscale="log")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"llmq bench --compile — {report['device']} ({report['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from llmq.cli.bench import add_arguments, add_compile_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    add_compile_arguments(ap)
    args = ap.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

