"""``llmq generate``: greedy (or sampled) text generation from a model folder."""

from __future__ import annotations

import argparse
import time

from llmq.cli.common import add_runtime_arguments, load_for_inference
from llmq.recipes import SUPPORTED_KV_BITS, SUPPORTED_KV_GROUP_SIZES, KVAxis, KVRecipe


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a quantized (or float) model",
        description="Load a model folder with transformers (after `import llmq`) and continue a prompt.",
    )
    p.add_argument("model", help="llmq checkpoint folder, float model folder, or 'smollm2-135m'")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    kv = p.add_argument_group("quantized KV cache (KIVI-style; see docs/kv_cache.md)")
    kv.add_argument("--kv-bits", type=int, choices=SUPPORTED_KV_BITS, default=None,
                    help="store the KV cache as int8/int4/int2 (default: full-precision cache)")
    kv.add_argument("--kv-residual", type=int, default=None,
                    help="most recent tokens kept in full precision (default 128)")
    kv.add_argument("--kv-key-axis", choices=[a.value for a in KVAxis], default=None,
                    help="keys quantized per channel (default, KIVI) or per token; values are always per token")
    kv.add_argument("--kv-group", type=int, choices=SUPPORTED_KV_GROUP_SIZES, default=None,
                    help="tokens (per-channel keys) / channels (per-token) sharing a scale (default 64)")
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def _kv_recipe(args: argparse.Namespace) -> KVRecipe | None:
    given = [f"--kv-{n}" for n in ("residual", "key-axis", "group")
             if getattr(args, "kv_" + n.replace("-", "_")) is not None]
    if args.kv_bits is None:
        if given:
            raise ValueError(f"{', '.join(given)} only apply to a quantized KV cache: add --kv-bits 8|4|2")
        return None
    defaults = KVRecipe()
    return KVRecipe(bits=args.kv_bits, key_axis=args.kv_key_axis or defaults.key_axis,
                    group_size=args.kv_group or defaults.group_size,
                    residual_length=defaults.residual_length if args.kv_residual is None else args.kv_residual)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    kv_recipe = _kv_recipe(args)
    model, tokenizer, device = load_for_inference(args)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    cache_kw, cache = {}, None
    if kv_recipe is not None:
        from llmq.kv import QuantizedKVCache, cache_kwarg, enable_fused_attention

        cache = QuantizedKVCache(model.config, recipe=kv_recipe)  # validates head_dim vs group
        enable_fused_attention(model)
        cache_kw = {cache_kwarg(model): cache}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **sampling, **cache_kw)
    seconds = time.perf_counter() - start
    new = out[0, inputs.input_ids.shape[1]:]
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{new.numel()} tokens in {seconds:.2f} s, {new.numel() / seconds:.1f} tokens/s]")
    if cache is not None:
        mem = cache.memory()
        print(f"[KV cache int{kv_recipe.bits}, keys per {kv_recipe.key_axis.value}: {mem.used_bytes / 2**20:.2f} MiB "
              f"for {mem.tokens} tokens ({mem.quantized_tokens} quantized) = {mem.ratio:.2f}x an fp16 cache]")
    return 0
