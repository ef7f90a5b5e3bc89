"""Teacher-forced perplexity with a quantized KV cache in the loop (SmolLM2-135M by default).

Protocol: the ``shared/PEERS.md`` evaluation text and non-overlapping windows (512
tokens, no BOS), but each window is fed through the model in chunks of ``--chunk``
tokens with the cache carrying everything before the chunk — so from the second
chunk on, the model attends over *quantized* past keys/values exactly as it does
while generating. The first chunk of a window is the prefill (full precision).
``--chunk 1`` is token by token (decode conditions exactly; slow on CPU). With
chunks, a token sees up to ``chunk - 1`` more full-precision neighbours than in
token-by-token decoding (the residual window is flushed between chunks).

Rows: full-precision cache (``DynamicCache``), llmq int8/int4/int2 with per-channel
and per-token keys, and transformers' ``QuantizedCache`` with the quanto backend
(int4/int2; it only runs when ``optimum-quanto`` is installed: ``pip install
'llmq[kv-compare]'``). Writes JSON (and a markdown table) under ``--out``.

    python scripts/eval_kv_quality.py --tokens 2048 --chunk 16
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from llmq.kv import QuantizedKVCache, QuantizedStaticCache, cache_kwarg


def make_cache(row: dict, config):
    kind = row["cache"]
    if kind == "fp":
        return DynamicCache(config=config)
    if kind == "llmq":
        return QuantizedKVCache(config, bits=row["bits"], key_axis=row["key_axis"], group_size=row["group"],
                                residual_length=row["residual"], symmetric=False)
    if kind == "llmq-static":  # the static-shape twin; a window never exceeds its max_cache_len
        return QuantizedStaticCache(config, max_cache_len=row["max_len"], bits=row["bits"], key_axis=row["key_axis"],
                                    group_size=row["group"], residual_length=row["residual"], symmetric=False)
    if kind == "hf-quanto":
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache("quanto", config, nbits=row["bits"], axis_key=0, axis_value=0,
                              q_group_size=row["group"], residual_length=row["residual"])
    raise ValueError(kind)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, row: dict, chunk: int) -> tuple[float, int]:
    """Summed NLL of ``ids[1:]`` given the prefix, fed ``chunk`` tokens at a time through a fresh cache."""
    cache = make_cache(row, model.config)
    kw = cache_kwarg(model)
    nll, n = 0.0, 0
    for s in range(0, ids.numel(), chunk):
        x = ids[s:s + chunk][None]
        logits = model(input_ids=x, use_cache=True, **{kw: cache}).logits[0].float()
        nxt = ids[s + 1:s + 1 + x.shape[1]]
        logits = logits[: nxt.numel()]
        nll += float(torch.nn.functional.cross_entropy(logits, nxt, reduction="sum"))
        n += nxt.numel()
    return nll, n


def rows(args) -> list[dict]:
    out = [dict(name="full precision (DynamicCache)", cache="fp")]
    for bits in (8, 4, 2):
        for axis in ("channel", "token"):
            out.append(dict(name=f"llmq int{bits} keys/{axis}", cache="llmq", bits=bits, key_axis=axis,
                            group=args.group, residual=args.residual))
            if args.static:
                out.append(dict(name=f"llmq static int{bits} keys/{axis}", cache="llmq-static", bits=bits,
                                key_axis=axis, group=args.group, residual=args.residual, max_len=args.window))
    try:
        import optimum.quanto  # noqa: F401

        for bits in (4, 2):
            out.append(dict(name=f"transformers QuantizedCache quanto int{bits}", cache="hf-quanto", bits=bits,
                            group=args.group, residual=args.residual))
    except ImportError:
        print("optimum-quanto not installed: skipping transformers' QuantizedCache rows")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (first N of the PEERS text)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16, help="tokens per forward (1 = token by token)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="substrings of row names to run")
    ap.add_argument("--static", action="store_true", help="also run llmq.QuantizedStaticCache rows")
    ap.add_argument("--out", default="results/kv_quality")
    args = ap.parse_args()

    from llmq.data.bbc import eval_text
    from llmq.model.source import load_model

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model, dtype=torch.float32, device="cpu")
    model.eval()
    ids = tokenizer(eval_text(), add_special_tokens=False, return_tensors="pt").input_ids[0][: args.tokens]
    windows = [w for w in torch.split(ids, args.window) if w.numel() >= 2]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    selected = [r for r in rows(args) if not args.only or any(s in r["name"] for s in args.only)]
    for row in selected:
        start = time.perf_counter()
        nll, n = 0.0, 0
        for w in tqdm(windows, desc=row["name"], unit="window"):
            a, b = window_nll(model, w, row, args.chunk)
            nll, n = nll + a, n + b
        res = dict(row, perplexity=math.exp(nll / n), predicted=n, tokens=int(ids.numel()), chunk=args.chunk,
                   window=args.window, seconds=round(time.perf_counter() - start, 1))
        results.append(res)
        print(json.dumps(res))
        (out_dir / f"kv_quality_chunk{args.chunk}.json").write_text(json.dumps(results, indent=1))
    base = next((r["perplexity"] for r in results if r["cache"] == "fp"), None)
    lines = ["| KV cache | bits | keys | group | residual | perplexity | Δ vs fp |", "|---|---|---|---|---|---|---|"]
    for r in results:
        delta = "–" if base is None or r["cache"] == "fp" else f"{100 * (r['perplexity'] / base - 1):+.2f}%"
        lines.append(f"| {r['name']} | {r.get('bits', '–')} | {r.get('key_axis', '–' if r['cache'] == 'fp' else 'axis 0')}"
                     f" | {r.get('group', '–')} | {r.get('residual', '–')} | {r['perplexity']:.3f} | {delta} |")
    table = "\n".join(lines)
    (out_dir / f"kv_quality_chunk{args.chunk}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
