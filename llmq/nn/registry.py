"""Module kinds a checkpoint can hold, so a loader can rebuild them from ``config.json``.

Each quantized module class declares::

    KIND: str                                   # e.g. "quant_linear"
    def to_config(self) -> dict                 # JSON; includes {"kind": KIND}
    @classmethod
    def from_config(cls, cfg, in_features, out_features, bias, dtype, device) -> module

and is registered once with ``register_module_kind``. A checkpoint stores
``quantization_config["modules"] = {module_name: module.to_config()}``; loading
calls ``build_module`` for each entry to replace the ``nn.Linear`` of that name
with an empty module whose buffers the checkpoint then fills.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_KINDS: dict[str, type] = {}


def register_module_kind(cls: type) -> type:
    """Register a quantized module class under ``cls.KIND`` (usable as a decorator)."""
    kind = getattr(cls, "KIND", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{cls.__name__} needs a non-empty string KIND to be registered")
    if _KINDS.get(kind, cls) is not cls:
        raise ValueError(f"module kind {kind!r} is already registered by {_KINDS[kind].__name__}")
    _KINDS[kind] = cls
    return cls


def module_kinds() -> list[str]:
    return sorted(_KINDS)


def check_config_shape(cfg: dict[str, Any], in_features: int, out_features: int) -> None:
    """Raise ``ValueError`` when a checkpoint module's recorded shape differs from the model's Linear."""
    if (cfg.get("in_features", in_features), cfg.get("out_features", out_features)) != (in_features, out_features):
        raise ValueError(
            f"checkpoint module is {cfg['in_features']}->{cfg['out_features']} but the model's Linear is "
            f"{in_features}->{out_features}; config.json and the weights do not match")


def build_module(
    cfg: dict[str, Any],
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """An empty quantized module of ``cfg["kind"]`` shaped like ``Linear(in_features, out_features)``."""
    kind = cfg.get("kind")
    if kind not in _KINDS:
        raise ValueError(
            f"checkpoint module kind {kind!r} is unknown to this llmq (knows {module_kinds()}); "
            f"upgrade llmq or re-quantize the model"
        )
    return _KINDS[kind].from_config(cfg, in_features, out_features, bias, dtype, device)
