"""``llmq export``: write an llmq checkpoint in a format other runtimes load (compressed-tensors, GPTQ, ONNX)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the keys of llmq.checkpoint.export.EXPORT_FORMATS (a test keeps them equal); spelled out here so
# that building the parser does not import torch
FORMATS = ("compressed-tensors", "gptq")

ONNX = "onnx"


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert an llmq checkpoint for vLLM / compressed-tensors / GPTQ loaders, or to ONNX (Q/DQ)",
        description="Write a weight-only llmq checkpoint as a compressed-tensors 'pack-quantized' checkpoint "
        "(vLLM loads it natively, transformers through the compressed-tensors package) or as a GPTQ v1 "
        "checkpoint (symmetric only); or any Llama-style llmq checkpoint (weight-only, W8A8 static/dynamic, "
        "float) as ONNX with explicit QuantizeLinear/DequantizeLinear (opset 21; TensorRT, onnxruntime; "
        "needs `pip install 'llmq[onnx]'`). Integer zero points only (re-quantize HQQ with --zero-point int). "
        "The source is only read; the output is written atomically.",
    )
    p.add_argument("model", type=Path, help="llmq checkpoint folder (from `llmq quantize`)")
    p.add_argument("--format", choices=[*FORMATS, ONNX], default="compressed-tensors",
                   help="compressed-tensors (pack-quantized; default), gptq (v1, symmetric checkpoints) or onnx")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seq-len", type=int, default=None,
                   help="onnx only: fixed sequence length (default: a dynamic sequence axis)")
    p.add_argument("--kv-cache", action="store_true",
                   help="onnx only: add past_key_values.{i}.key/value inputs and present.{i}.key/value outputs "
                   "so that one graph runs the prompt and each decode step")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out model folder (a folder without config.json is never replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == ONNX:
        from llmq.onnx import export_onnx

        print(export_onnx(args.model, args.out, seq_len=args.seq_len, force=args.force, kv_cache=args.kv_cache))
        return 0
    if args.seq_len is not None or args.kv_cache:
        raise ValueError("--seq-len and --kv-cache apply to --format onnx only")
    from llmq.checkpoint.export import export_checkpoint

    out = export_checkpoint(args.model, args.out, args.format, force=args.force)
    print(f"wrote {out} ({args.format})")
    return 0
