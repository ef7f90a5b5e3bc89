"""KV-cache memory of ``QuantizedKVCache`` vs an fp16 cache at a given context, measured by the cache itself.

Random fp16 key/value states of a model's shape go through one cache layer (all
layers of a Llama are identical, so one layer times ``num_hidden_layers`` is the
model's cache): a prefill of ``context - 1`` tokens and one decode step. Bytes
used count codes + scales + zeros + the full-precision residual window; they are
checked against the theoretical count in ``llmq.quant.kv.kv_block_nbytes``.

    python scripts/kv_memory.py --context 8192
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig

from llmq.kv import QuantizedKVCache
from llmq.quant.kv import kv_block_nbytes

SHAPES = {  # name: (layers, kv heads, head_dim)
    "smollm2-135m": (30, 3, 64),
    "llama-7b": (32, 32, 128),
    "llama-3-8b (GQA)": (32, 8, 128),
}


def measure(shape, context, batch, bits, axis, group, residual, symmetric) -> dict:
    layers, heads, d = shape
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=heads,
                      hidden_size=heads * d, head_dim=d)
    cache = QuantizedKVCache(cfg, bits=bits, key_axis=axis, group_size=group, residual_length=residual,
                             symmetric=symmetric)
    k = torch.randn(batch, heads, context, d, dtype=torch.float16)
    cache.update(k[:, :, :-1], k[:, :, :-1], 0)
    cache.update(k[:, :, -1:], k[:, :, -1:], 0)
    mem = cache.memory()
    n = mem.quantized_tokens
    theory = (kv_block_nbytes(n, batch, heads, d, bits, group, axis == "channel", symmetric)
              + kv_block_nbytes(n, batch, heads, d, bits, group, False, symmetric)
              + 2 * batch * heads * (context - n) * d * 2)
    assert mem.used_bytes == theory, (mem.used_bytes, theory)
    return dict(bits=bits, key_axis=axis, group=group, residual=residual, symmetric=symmetric, context=context,
                used_MiB=layers * mem.used_bytes / 2**20, fp16_MiB=layers * mem.fp16_bytes / 2**20, ratio=mem.ratio,
                residual_tokens=context - n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    print(f"| model shape | bits | keys | group | sym | KV MiB at {args.context} | fp16 MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for bits in (8, 4, 2):
            for group, sym in ((64, False), (32, False), (64, True)):
                r = dict(measure(shape, args.context, args.batch, bits, "channel", group, args.residual, sym),
                         model=name)
                rows.append(r)
                print(f"| {name} | {bits} | channel | {group} | {'sym' if sym else 'asym'} | {r['used_MiB']:.1f} | "
                      f"{r['fp16_MiB']:.1f} | {r['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
