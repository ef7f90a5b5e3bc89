"""``llmq bench``: long-sequence generation throughput, fp16 KV vs quantized KV (see ``llmq.kv.bench``)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from llmq.kv.bench import add_arguments

    p = sub.add_parser(
        "bench",
        help="generation throughput at long context: fp16 vs int8/int4/int2 KV cache, fp vs int4 weights",
        description="Time prefill and decode (tokens/s), KV memory and the largest batch that fits, for each KV "
                    "cache and context length; writes JSON and a plot. On CUDA a Llama-7B-shaped random model, on "
                    "CPU the small default model at short contexts (a plumbing check, not a speed number).",
    )
    add_arguments(p)
    from llmq.kv.bench_compile import add_compile_arguments

    add_compile_arguments(p)  # --compile: static caches + torch.compile (llmq.kv.bench_compile)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "compile", False):
        from llmq.kv.bench_compile import run as run_compiled_bench

        return run_compiled_bench(args)
    from llmq.kv.bench import run as run_bench

    return run_bench(args)
