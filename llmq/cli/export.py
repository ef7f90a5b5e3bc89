"""``llmq export``: write an llmq checkpoint in a format other runtimes load (compressed-tensors, GPTQ)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the keys of llmq.checkpoint.export.EXPORT_FORMATS (a test keeps them equal); spelled out here so
# that building the parser does not import torch
FORMATS = ("compressed-tensors", "gptq")


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert a weight-only llmq checkpoint for vLLM / compressed-tensors / GPTQ loaders",
        description="Write a weight-only llmq checkpoint as a compressed-tensors 'pack-quantized' checkpoint "
        "(vLLM loads it natively, transformers through the compressed-tensors package) or as a GPTQ v1 "
        "checkpoint (symmetric only). Integer zero points only (re-quantize HQQ with --zero-point int) and "
        "group sizes that divide every in_features. The source is only read; the output is written atomically.",
    )
    p.add_argument("model", type=Path, help="llmq checkpoint folder (from `llmq quantize`)")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors",
                   help="compressed-tensors (pack-quantized; default) or gptq (v1, symmetric checkpoints)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out model folder (a folder without config.json is never replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmq.checkpoint.export import export_checkpoint

    out = export_checkpoint(args.model, args.out, args.format, force=args.force)
    print(f"wrote {out} ({args.format})")
    return 0
