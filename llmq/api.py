"""The public Python API: quantize a model folder into a checkpoint, load a checkpoint."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq.calibration import CalibrationSpec
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
    recipe: WeightRecipe | None = None  # as run: method_args resolved to the method's full arguments


def quantize(
    model: str | os.PathLike,
    recipe: WeightRecipe,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    calibration: CalibrationSpec | None = None,
    max_memory_mb: float | None = None,
    device: str | None = None,
    lm_head: str = "float",
) -> QuantizeResult:
    """Quantize the float model ``model`` (folder, ``"smollm2-135m"`` or hub id) with ``recipe``.

    When ``out_dir`` is given the result is saved there as an llmq checkpoint
    (atomically; an existing non-empty folder needs ``force``). The source folder
    is only read. Output problems are reported before the model is loaded.

    Methods other than plain RTN (GPTQ, AWQ, HQQ, RTN with ``method_args``), and
    any run with ``max_memory_mb``, go through the layer pipeline
    (``llmq.pipeline``): one decoder layer in memory at a time. GPTQ and AWQ
    use ``calibration`` (default: 128 x 512 tokens of the BBC calibration split);
    calibration problems are reported before any work starts. The method's full
    arguments and the calibration used are recorded in ``recipe.method_args``.
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; checked first) also sends RTN through the
    pipeline, so that it runs where asked. ``lm_head`` (``"float"``, ``"int8"``, ``"int4"``;
    ``llmq.model.lm_head``) quantizes the output head too, round-to-nearest, untying a tied one
    (the embedding stays float); it is recorded as ``quantization_config["lm_head"]``.
    """
    from llmq.model.lm_head import lm_head_choice

    lm_head = lm_head_choice(lm_head)  # an unknown choice fails before any work
    if device is not None:
        from llmq.devices import resolve_device

        device = resolve_device(device)
    source = resolve_model_path(model)
    check_float_source(source)
    if out_dir is not None:
        check_output_dir(out_dir, force, source_dir=source)
    if (recipe.method is not WeightMethod.RTN or recipe.method_args or max_memory_mb is not None
            or device is not None):
        return _quantize_layerwise(source, recipe, out_dir, force, progress, trust_remote_code, calibration,
                                   max_memory_mb, device, lm_head)
    fp_model, tokenizer, _ = load_model(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    summary = quantize_model_rtn(fp_model, recipe, progress=progress)
    return _finish(fp_model, tokenizer, summary, recipe, lm_head, out_dir, force, source)


def _finish(model, tokenizer, summary, recipe, lm_head, out_dir, force, source) -> QuantizeResult:
    """Quantize the head if asked, and save the checkpoint when ``out_dir`` is given."""
    from llmq.model.lm_head import LmHead, quantize_lm_head

    summary = quantize_lm_head(model, lm_head, summary)
    saved = None
    if out_dir is not None:
        extra = None if lm_head is LmHead.FLOAT else {"lm_head": lm_head.value}
        qcfg = build_quantization_config(model, recipe, extra)
        saved = save_quantized(model, tokenizer, out_dir, qcfg, force=force, source_dir=source)
    return QuantizeResult(model, tokenizer, summary, saved, recipe)


def _quantize_layerwise(source, recipe, out_dir, force, progress, trust_remote_code, calibration, max_memory_mb,
                        device, lm_head) -> QuantizeResult:
    from transformers import AutoTokenizer

    from llmq.calibration import calibration_batch, check_calibration_source
    from llmq.pipeline import NEEDS_CALIBRATION, method_args, quantize_layerwise

    args = method_args(recipe)  # unknown method or arguments: fail now
    ids = None
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if recipe.method in NEEDS_CALIBRATION:
        calibration = calibration or CalibrationSpec()
        check_calibration_source(calibration.source)
        ids = calibration_batch(tokenizer, calibration)  # empty / too short: fails before any work
        args["calibration"] = calibration.to_dict()
    recipe = dataclasses.replace(recipe, method_args=args)
    model, summary = quantize_layerwise(source, recipe, ids, device=device, max_memory_mb=max_memory_mb,
                                        progress=progress, trust_remote_code=trust_remote_code)
    return _finish(model, tokenizer, summary, recipe, lm_head, out_dir, force, source)


def check_float_source(folder: Path) -> None:
    """Refuse a source that is already quantized (llmq or another method) before any work."""
    from llmq.model.source import read_model_config

    qcfg = read_model_config(folder).get("quantization_config")
    if not qcfg:
        return
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method == "llmq":
        weight = qcfg.get("weight") or {}
        raise ValueError(f"{folder} is already an llmq checkpoint ({weight.get('bits')}-bit, method "
                         f"{weight.get('method')}); quantize the float model it was made from instead")
    raise ValueError(f"{folder} is already quantized (quant_method {method!r}); llmq quantizes float models: "
                     f"pass the original float model folder")


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
    from llmq.model.source import read_model_config

    cfg = read_model_config(folder)  # a damaged config.json: ValueError naming the file
    return (cfg.get("quantization_config") or {}).get("quant_method") == "llmq"
