"""Argument helpers shared by several subcommands (device and dtype choice)."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="activation dtype (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the model folder/hub to run (off by default)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_for_inference(args: argparse.Namespace):
    """``(model, tokenizer, device)`` for ``args.model`` per the runtime arguments."""
    from llmq.api import load

    device = resolve_device(args.device)
    model, tokenizer = load(args.model, dtype=resolve_dtype(args.dtype, device),
                            trust_remote_code=args.trust_remote_code)
    return model.to(device), tokenizer, device
