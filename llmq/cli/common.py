"""Argument helpers shared by several subcommands (device and dtype choice).

Nothing here imports torch at parse time: ``llmq --help`` must stay fast.
"""

from __future__ import annotations

import argparse

from llmq.devices import DEVICE_HELP

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="activation dtype (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the model folder/hub to run (off by default)")


def resolve_dtype(name: str | None, device):
    import torch

    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_for_inference(args: argparse.Namespace):
    """``(model, tokenizer, device)`` for ``args.model`` per the runtime arguments."""
    from llmq.api import load
    from llmq.devices import resolve_device

    device = resolve_device(args.device)  # before loading: a bad --device fails in a second
    model, tokenizer = load(args.model, dtype=resolve_dtype(args.dtype, device),
                            trust_remote_code=args.trust_remote_code)
    return model.to(device), tokenizer, device
