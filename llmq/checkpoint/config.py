"""The ``quantization_config`` block of an llmq checkpoint's ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from llmq._version import __version__
from llmq.recipes import FORMAT_VERSION, WeightRecipe, check_format_version

QUANT_METHOD = "llmq"


def build_quantization_config(
    model: nn.Module, recipe: WeightRecipe, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``quantization_config`` for a model whose quantized modules are already swapped in.

    Every module with a ``to_config()`` (see ``llmq.nn.registry``) is listed by name,
    so a loader rebuilds exactly these modules. ``extra`` adds top-level keys
    (activation / KV recipes, calibration details).
    """
    modules = {name: m.to_config() for name, m in model.named_modules() if hasattr(m, "to_config")}
    cfg = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "llmq_version": __version__,
        "weight": recipe.to_dict(),
        "modules": modules,
    }
    cfg.update(extra or {})
    return cfg


def validate_quantization_config(cfg: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless ``cfg`` is an llmq block this version can load."""
    if cfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}: quant_method is {cfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    check_format_version(cfg.get("format_version"), where)
    WeightRecipe.from_dict(cfg["weight"])
    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{where}: quantization_config lists no quantized modules; the checkpoint is damaged")


def read_quantization_config(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``folder/config.json``'s llmq ``quantization_config``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    cfg = config.get("quantization_config")
    if cfg is None:
        raise ValueError(f"{path} has no quantization_config: {folder} is not a quantized (llmq) checkpoint")
    validate_quantization_config(cfg, str(path))
    return cfg
