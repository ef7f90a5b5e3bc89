"""``llmq bench``: long-sequence generation throughput, fp16 KV vs quantized KV (see ``llmq.kv.bench``).

The options are defined here, not in ``llmq.kv.bench``, so that building the parser imports neither
torch nor the KV kernels (``llmq --help`` stays fast); ``scripts/bench_generate.py`` uses the same
``add_arguments``.
"""

from __future__ import annotations

import argparse

KV_CHOICES = ("fp", "8", "4", "2")  # fp: DynamicCache in the model dtype (fp16 on CUDA)
WEIGHT_CHOICES = ("fp", "bf16", "int4", "int4-g64", "int8",
                  "int4-head8", "int4-g64-head8", "int8-head8")  # llmq.kv.bench.WEIGHT_RECIPES


def _number(kind, minimum):
    """argparse type: a ``kind`` (int or float) of at least ``minimum``."""
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value!r}")
        return number
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="'llama-7b-random' (default on CUDA), 'smollm2-135m' (default on "
                                                 "CPU) or a model folder")
    p.add_argument("--contexts", type=_number(int, 1), nargs="+", default=None,
                   help="prompt lengths (default CUDA: 1024 … 32768; CPU: 256, a quick check of about a minute)")
    p.add_argument("--batches", type=_number(int, 1), nargs="+", default=[1], help="batch sizes to time (default 1)")
    p.add_argument("--kv", nargs="+", default=list(KV_CHOICES), choices=KV_CHOICES,
                   help="KV caches to compare: fp (full precision), 8, 4, 2 bits (default: all)")
    p.add_argument("--weights", nargs="+", default=None, choices=WEIGHT_CHOICES,
                   help="model weights: fp (the model dtype), bf16, int4 (RTN, group 128), int4-g64, int8 (RTN, per channel); "
                        "-head8: the output head int8 too (quantize --lm-head int8) (default CUDA: fp int4; CPU: fp)")
    p.add_argument("--new-tokens", type=_number(int, 1), default=None,
                   help="decode steps timed (default CUDA 64, CPU 8)")
    p.add_argument("--residual", type=_number(int, 0), default=128,
                   help="most recent tokens a quantized KV cache keeps in full precision (default 128); a context "
                        "inside this window is not quantized at all")
    p.add_argument("--group", type=int, default=64,
                   help="tokens (keys, per channel) / channels (values, per token) sharing a KV scale (default 64)")
    p.add_argument("--memory-budget-gb", type=_number(float, 1e-3), default=None,
                   help="memory budget for the largest-batch search (CUDA default: the whole GPU; CPU default 16)")
    p.add_argument("--max-batch", type=_number(int, 1), default=256,
                   help="upper bound of the largest-batch search (default 256)")
    p.add_argument("--no-batch-search", action="store_true", help="skip the largest-batch search")
    p.add_argument("--out", default="results/bench", help="output folder for JSON and plot (default results/bench)")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--compile`` option and its own settings (run by ``llmq.kv.bench_compile``)."""
    p.add_argument("--compile", action="store_true",
                   help="static caches + torch.compile'd decode step (CUDA graphs on a GPU); writes "
                        "bench_compile.json/png (llmq.kv.bench_compile)")
    p.add_argument("--compile-backend", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend for --compile (default: inductor; eager checks the graphs only)")


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="generation throughput at long context: fp16 vs int8/int4/int2 KV cache, fp vs int4 weights",
        description="Time prefill and decode (tokens/s), KV memory and the largest batch that fits, for each KV "
                    "cache and context length; writes JSON and a plot. On CUDA a Llama-7B-shaped random model, on "
                    "CPU the small default model at one short context (a plumbing check of about a minute, not a "
                    "speed number).",
    )
    add_arguments(p)
    add_compile_arguments(p)  # --compile: static caches + torch.compile (llmq.kv.bench_compile)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "compile", False):
        from llmq.kv.bench_compile import run as run_compiled_bench

        return run_compiled_bench(args)
    from llmq.kv.bench import run as run_bench

    return run_bench(args)
