"""The public Python API: quantize a model folder into a checkpoint, load a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq.checkpoint import build_quantization_config, read_quantization_config, save_quantized, verify_checkpoint
from llmq.checkpoint.save import check_output_dir
from llmq.model.rtn import QuantizationSummary, quantize_model_rtn
from llmq.model.source import load_model, resolve_model_path
from llmq.recipes import WeightMethod, WeightRecipe


@dataclass
class QuantizeResult:
    model: torch.nn.Module
    tokenizer: object
    summary: QuantizationSummary
    out_dir: Path | None


def quantize(
    model: str | os.PathLike,
    recipe: WeightRecipe,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> QuantizeResult:
    """Quantize the float model ``model`` (folder, ``"smollm2-135m"`` or hub id) with ``recipe``.

    When ``out_dir`` is given the result is saved there as an llmq checkpoint
    (atomically; an existing non-empty folder needs ``force``). The source folder
    is only read. Output problems are reported before the model is loaded.
    """
    source = resolve_model_path(model)
    if out_dir is not None:
        check_output_dir(out_dir, force, source_dir=source)
    if recipe.method is not WeightMethod.RTN:
        raise ValueError(f"method {recipe.method.value!r} is not available in this build; use 'rtn'")
    fp_model, tokenizer, _ = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    summary = quantize_model_rtn(fp_model, recipe, progress=progress)
    saved = None
    if out_dir is not None:
        qcfg = build_quantization_config(fp_model, recipe)
        saved = save_quantized(fp_model, tokenizer, out_dir, qcfg, force=force, source_dir=source)
    return QuantizeResult(fp_model, tokenizer, summary, saved)


def load(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device_map=None,
    trust_remote_code: bool = False,
):
    """Load an llmq checkpoint (or a float model folder) with plain ``transformers``.

    Equivalent to ``import llmq; AutoModelForCausalLM.from_pretrained(folder, ...)``
    with safetensors enforced; returns ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(folder)
    if is_quantized_checkpoint(path):
        # clear errors for unknown format versions, truncated shards, missing tensors —
        # before transformers parses anything itself
        verify_checkpoint(sorted(path.glob("*.safetensors")), read_quantization_config(path))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def is_quantized_checkpoint(folder: str | os.PathLike) -> bool:
    """True if ``folder/config.json`` declares an llmq ``quantization_config``."""
    import json

    cfg = json.loads((Path(folder) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "llmq"
