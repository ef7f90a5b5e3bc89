"""Long-sequence generation throughput: fp16 KV vs int8/int4/int2 KV, with and without int4 weights.

For every (weights, KV cache, context length, batch) it runs a prefill of
``context`` random tokens and ``--new-tokens`` greedy decode steps (a plain loop
over ``model(...)`` with the cache — ``generate`` without its bookkeeping) and
reports prefill and decode tokens/s separately, the KV cache's bytes and the peak
memory; then the largest batch that fits a memory budget at each context.

* CUDA: a Llama-7B-shaped model with random fp16 weights (``--model llama-7b-random``;
  speed does not depend on weight values), contexts 1k…32k, quantized KV decoded
  by the Triton kernel. The largest batch that fits ``--memory-budget-gb`` is computed from
  the batch-1 run's measured bytes and then *run* (one prefilled sequence's cache repeated
  to the batch, see ``run_one``), stepping down on OOM or a measured peak over budget; its
  decode tokens/s is the throughput at a fixed memory budget.
* CPU: the small model (SmolLM2-135M) at short contexts, the pure-torch attention
  path — numbers show the plumbing works, NOT kernel speed. The largest batch is
  *computed* from the measured weight bytes and the cache's measured bytes per
  sequence against ``--memory-budget-gb`` (no allocation attempted).

Writes ``bench_generate.json`` and ``bench_generate.png`` (tokens/s and KV memory vs
context) under ``--out``. Entry points: ``llmq bench`` and ``scripts/bench_generate.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from llmq.cli.bench import KV_CHOICES, add_arguments  # noqa: F401  (the options live with the CLI)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --weights (llmq.cli.bench.WEIGHT_CHOICES): the model's float dtype, or RTN via llmq as (bits, group, lm_head):
# int4 = group 128, int8 per channel; "-head8": the output head too, int8 (llmq.model.lm_head; untied if tied)
WEIGHT_RECIPES = {"fp": None, "bf16": None, "int4": (4, 128, "float"), "int4-g64": (4, 64, "float"),
                  "int8": (8, None, "float"), "int4-head8": (4, 128, "int8"), "int4-g64-head8": (4, 64, "int8"),
                  "int8-head8": (8, None, "int8")}


def build_model(name: str, weights: str, device: torch.device, dtype: torch.dtype):
    """``(model, weight_bytes)``; ``weights`` is one of ``WEIGHT_RECIPES`` (``bf16``: the model cast to bf16)."""
    if weights not in WEIGHT_RECIPES:
        raise ValueError(f"--weights must be one of {list(WEIGHT_RECIPES)}, got {weights!r}")
    if weights == "bf16":
        dtype = torch.bfloat16
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "llama-7b-random":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=65536)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)  # random init; values do not change speed
    else:
        from llmq.model.source import load_model

        model, _, _ = load_model(name, dtype=dtype, device=str(device))
    model.eval()
    if WEIGHT_RECIPES[weights] is not None:
        from llmq.model.lm_head import quantize_lm_head
        from llmq.api import quantize
        from llmq.recipes import WeightRecipe

        bits, group, head = WEIGHT_RECIPES[weights]
        quantize(model, WeightRecipe(bits=bits, group_size=group), progress=False, device=str(device))
        quantize_lm_head(model, head)
        model.to(device)
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return model, nbytes


def make_cache(model, kv: str, residual: int, group: int):
    from transformers import DynamicCache

    from llmq.kv import QuantizedKVCache

    if kv == "fp":
        return DynamicCache(config=model.config)
    return QuantizedKVCache(model.config, bits=int(kv), residual_length=residual, group_size=group)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere), e.g. 'AMD EPYC 9654'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def kv_bytes(cache) -> int:
    if hasattr(cache, "memory"):
        return cache.memory().used_bytes
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)


@torch.no_grad()
def run_one(model, kv: str, context: int, batch: int, new_tokens: int, residual: int, group: int,
            replicate: bool = False) -> dict:
    """Prefill ``batch x context`` random tokens, then time ``new_tokens`` greedy decode steps.

    ``replicate``: prefill one sequence and repeat its cache ``batch`` times
    (``Cache.batch_repeat_interleave``) — decode speed does not depend on the cached values, and
    prefilling ``batch x 32k`` tokens of a 7B model would cost minutes per measurement. The prefill
    rate is then that of one sequence.
    """
    from llmq.kv import cache_kwarg

    device = next(model.parameters()).device
    kw = cache_kwarg(model)
    rows = 1 if replicate else batch
    ids = torch.randint(0, model.config.vocab_size, (rows, context), device=device)
    cache = make_cache(model, kv, residual, group)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
    _sync(device)
    prefill_s = time.perf_counter() - t0
    nxt = logits[:, -1:].argmax(-1)
    del logits
    if replicate and batch > 1:
        cache.batch_repeat_interleave(batch)
        nxt = nxt.repeat(batch, 1)
    for _ in range(2):  # untimed: kernel autotuning and first-call set-up stay out of the decode rate
        nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - t0
    out = dict(kv=kv, context=context, batch=batch, new_tokens=new_tokens, replicated_prefill=replicate and batch > 1,
               prefill_tokens_per_s=rows * context / prefill_s, decode_tokens_per_s=batch * new_tokens / decode_s,
               prefill_s=prefill_s, decode_s=decode_s, kv_bytes=kv_bytes(cache))
    if hasattr(cache, "memory"):  # tokens outside the full-precision residual window
        out["kv_quantized_tokens"] = cache.memory().quantized_tokens
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del cache
    gc.collect()
    return out


def largest_batch_cuda(model, kv: str, context: int, args, one: dict, new_tokens: int) -> tuple[int, dict | None]:
    """The largest batch whose decode fits ``args.memory_budget_gb``, and its measured decode run.

    Computed from the batch-1 run ``one``: ``(budget - (peak - KV)) // KV bytes per sequence``
    (peak - KV = weights + the batch-1 prefill's activations, an upper bound on what decoding needs
    beside the cache), then run at that batch with a replicated prefill (``run_one``), stepping
    down while it runs out of memory or its measured peak exceeds the budget.
    """
    budget = args.memory_budget_gb * 2**30 if args.memory_budget_gb else torch.cuda.get_device_properties(
        0).total_memory
    per_seq = one["kv_bytes"]
    best = int((budget - (one["peak_bytes"] - per_seq)) // per_seq)
    best = min(best, args.max_batch)
    while best >= 1:
        try:
            r = run_one(model, kv, context, best, new_tokens, args.residual, args.group, replicate=True)
            if r["peak_bytes"] <= budget:
                return best, r
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        best = best - max(1, best // 10)
    return 0, None


def plot(results: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (weights, kv) in sorted({(r["weights"], r["kv"]) for r in results}):
        rows = sorted((r for r in results if r["weights"] == weights and r["kv"] == kv and r["batch"] == 1),
                      key=lambda r: r["context"])
        if not rows:
            continue
        label = f"W:{weights} KV:{kv}"
        axes[0].plot([r["context"] for r in rows], [r["decode_tokens_per_s"] for r in rows], "o-", label=label)
        axes[1].plot([r["context"] for r in rows], [r["kv_bytes"] / 2**20 for r in rows], "o-", label=label)
    axes[0].set(xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)", xscale="log")
    axes[1].set(xlabel="context (tokens)", ylabel="KV cache MiB (batch 1)", xscale="log", yscale="log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"llmq bench — {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from llmq.kv import enable_fused_attention

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model_name = args.model or ("llama-7b-random" if cuda else "smollm2-135m")
    # CPU: one short context, fp weights: a plumbing check that ends in about a minute
    contexts = args.contexts or ([1024, 2048, 4096, 8192, 16384, 32768] if cuda else [256])
    weights_list = args.weights or (["fp", "int4"] if cuda else ["fp"])
    new_tokens = args.new_tokens or (64 if cuda else 8)
    dtype = torch.float16 if cuda else torch.float32
    device_name = (torch.cuda.get_device_name(device) if cuda
                   else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)")
    if not cuda:
        print("No CUDA GPU: running the small model at short contexts on CPU with the pure-torch attention path. "
              "These numbers check the plumbing; they say nothing about the Triton kernel's speed.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, largest = [], []
    backends_used: set[str] = set()

    def report() -> dict:
        return dict(device=device_name, model=model_name, dtype=str(dtype), threads=torch.get_num_threads(),
                    quant_linear_backends=sorted(backends_used), new_tokens=new_tokens,
                    residual=args.residual, group=args.group, runs=results, largest_batch=largest)

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        tmp = out_dir / "bench_generate.json.tmp"
        tmp.write_text(json.dumps(report(), indent=1))
        tmp.replace(out_dir / "bench_generate.json")

    for weights in weights_list:
        model, weight_bytes = build_model(model_name, weights, device, dtype)
        backends_used.update(_quant_linear_backends(model, weights))
        enable_fused_attention(model)  # quantized decode steps read the packed cache; others use sdpa
        jobs = [(kv, c, b) for kv in args.kv for c in contexts for b in args.batches]
        for kv, context, batch in tqdm(jobs, desc=f"weights {weights}"):
            try:
                r = run_one(model, kv, context, batch, new_tokens, args.residual, args.group)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                r = dict(kv=kv, context=context, batch=batch, oom=True)
            r.update(weights=weights, weight_bytes=weight_bytes)
            results.append(r)
            save()
            print(json.dumps(r))
        if not args.no_batch_search:
            for kv in args.kv:
                for context in contexts:
                    one = next((r for r in results if r["weights"] == weights and r["kv"] == kv and
                                r["context"] == context and r["batch"] == 1 and not r.get("oom")), None)
                    if one is None:
                        continue
                    if cuda:
                        best, run_at_best = largest_batch_cuda(model, kv, context, args, one, new_tokens)
                        how = (f"computed from the batch-1 run's bytes against a {args.memory_budget_gb or 'whole-GPU'}"
                               f" GB budget, then run (prefill replicated), stepped down on OOM / over budget")
                    else:
                        budget = (args.memory_budget_gb or 16) * 2**30
                        fits = int(max(0, budget - one["weight_bytes"]) // one["kv_bytes"])
                        best, run_at_best = min(fits, args.max_batch), None
                        how = (f"computed: (budget - weights) / KV bytes per sequence, budget {budget / 2**30:g} GiB"
                               + (f" ({fits} fit; capped at --max-batch {args.max_batch})" if fits > best else ""))
                    row = dict(weights=weights, kv=kv, context=context, largest_batch=best, how=how)
                    if run_at_best is not None:
                        row.update(decode_tokens_per_s=run_at_best["decode_tokens_per_s"],
                                   peak_bytes=run_at_best["peak_bytes"], kv_bytes=run_at_best["kv_bytes"])
                    largest.append(row)
                    save()
                    print(json.dumps(row))
        del model
        gc.collect()
    save()
    plot([r for r in results if not r.get("oom")], out_dir / "bench_generate.png", device_name)
    print_table(report())
    print(f"wrote {out_dir / 'bench_generate.json'} and {out_dir / 'bench_generate.png'}")
    return 0


def _quant_linear_backends(model, weights: str) -> set[str]:
    """``"<weights>: <backend>"`` for the backends the model's ``QuantLinear`` layers chose (reported)."""
    from llmq.nn import QuantLinear

    return {f"{weights}: {backend.name}" for m in model.modules() if isinstance(m, QuantLinear)
            for backend in m._backend.values()}


def print_table(report: dict) -> None:
    print(f"\n{report['model']} on {report['device']}, {report['new_tokens']} decode steps")
    unquantized = sorted({r["context"] for r in report["runs"] if r.get("kv_quantized_tokens") == 0})
    if unquantized:
        print(f"Note: at context {', '.join(map(str, unquantized))} every token is still inside the quantized "
              f"caches' full-precision window (--residual {report['residual']}): nothing is quantized yet, so "
              f"their KV memory equals the fp cache's. Use contexts well above {report['residual']}.")
    print("| weights | KV | context | batch | prefill tok/s | decode tok/s | KV MiB | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        if r.get("oom"):
            print(f"| {r['weights']} | {r['kv']} | {r['context']} | {r['batch']} | OOM | OOM | – | – |")
            continue
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "–"
        print(f"| {r['weights']} | {r['kv']} | {r['context']} | {r['batch']} | {r['prefill_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.2f} | {r['kv_bytes'] / 2**20:.2f} | {peak} |")
    if report["largest_batch"]:
        print("\nLargest batch in the memory budget, and its decode throughput (ratio to the fp KV cache's):")
        print("| weights | KV | context | largest batch | decode tok/s | vs fp KV | peak MiB |")
        print("|---|---|---|---|---|---|---|")
        fp = {(r["weights"], r["context"]): r.get("decode_tokens_per_s") for r in report["largest_batch"]
              if r["kv"] == "fp"}
        for r in report["largest_batch"]:
            tps = r.get("decode_tokens_per_s")
            base = fp.get((r["weights"], r["context"]))
            ratio = f"{tps / base:.2f}x" if tps and base else "–"
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "–"
            print(f"| {r['weights']} | {r['kv']} | {r['context']} | {r['largest_batch']} | "
                  f"{f'{tps:.1f}' if tps else '–'} | {ratio} | {peak} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
