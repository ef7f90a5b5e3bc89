"""``llmq generate``: greedy (or sampled) text generation from a model folder."""

from __future__ import annotations

import argparse
import time

import torch

from llmq.cli.common import add_runtime_arguments, load_for_inference


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
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer, device = load_for_inference(args)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **sampling)
    seconds = time.perf_counter() - start
    new = out[0, inputs.input_ids.shape[1]:]
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{new.numel()} tokens in {seconds:.2f} s, {new.numel() / seconds:.1f} tokens/s]")
    return 0
