"""The public Python API: ``quantize`` (a model folder or a model in memory, any recipe) and ``load``.

``llmq quantize`` (``llmq.cli.quantize``) ─▶ ``quantize`` ─▶ ``llmq.pipeline.driver.run_layerwise`` ─▶ a layer
quantizer (``WeightQuantizer`` or ``W8A8Quantizer``) per decoder layer ─▶ checkpoint (``llmq.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq.calibration import CalibrationSpec
from llmq.checkpoint import build_quantization_config, read_quantization_config, save_quantized, verify_checkpoint
from llmq.checkpoint.save import check_output_dir
from llmq.model.source import resolve_model_path
from llmq.pipeline.summary import QuantizationSummary
from llmq.recipes import DEFAULT_EXCLUDE, ActivationRecipe, WeightMethod, WeightRecipe


@dataclass
class QuantizeResult:
    model: torch.nn.Module
    tokenizer: object  # None for a model passed in memory
    summary: QuantizationSummary
    out_dir: Path | None
    recipe: WeightRecipe | None = None  # as run: method_args resolved (W8A8: the int8 weight half)
    activation: ActivationRecipe | None = None  # W8A8 runs: the activation recipe


def quantize(
    model: str | os.PathLike | torch.nn.Module,
    recipe: WeightRecipe | ActivationRecipe,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    calibration: CalibrationSpec | None = None,
    max_memory_mb: float | None = None,
    device: str | None = None,
    lm_head: str = "float",
    *,
    calibration_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    exclude: tuple[str, ...] = (),
    backend: str | None = None,
) -> QuantizeResult:
    """Quantize ``model`` with ``recipe``: the one entry point for every method.

    ``model`` is a float model folder, ``"smollm2-135m"`` or a hub id (read one decoder layer at a time,
    never whole; the source is only read), or a model in memory (modified in place; nothing is saved).
    ``recipe`` is a ``WeightRecipe`` (RTN, GPTQ, AWQ, HQQ: ``llmq.pipeline.layerwise.WeightQuantizer``) or an
    ``ActivationRecipe`` (W8A8, int8 weights per channel: ``llmq.w8a8.layerwise.W8A8Quantizer``); both run
    in the one layer-wise driver, ``llmq.pipeline.driver.run_layerwise``.

    When ``out_dir`` is given the result is saved there as an llmq checkpoint (atomically; an existing
    non-empty folder needs ``force``). Output and calibration problems are reported before the model is read.

    Calibration (GPTQ, AWQ, SmoothQuant, static W8A8): ``calibration_ids`` ``[nsamples, seqlen]`` token ids
    if given, else windows drawn by ``llmq.calibration.calibration_batch`` from ``calibration`` (default 128
    x 512 tokens of the BBC calibration split; a folder only). The method's full arguments and the
    calibration used are recorded in ``recipe.method_args`` (W8A8: ``quantization_config["calibration"]``).
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; checked first): where layers run. ``max_memory_mb``:
    a budget the layer plan is checked against before any work (a folder only). ``lm_head`` (``"float"``,
    ``"int8"``, ``"int4"``; weight-only recipes; ``llmq.model.lm_head``) quantizes the output head too,
    round-to-nearest, untying a tied one; recorded as ``quantization_config["lm_head"]``. ``exclude`` (W8A8;
    a ``WeightRecipe`` has its own) adds fnmatch patterns of Linears kept in float; ``backend`` forces the
    ``W8A8Linear`` backend.
    """
    from llmq.model.lm_head import LmHead, lm_head_choice
    from llmq.pipeline.driver import run_layerwise

    lm_head = lm_head_choice(lm_head)  # an unknown choice fails before any work
    quantizer, weight_recipe = _quantizer(recipe, lm_head is not LmHead.FLOAT, exclude, backend)
    if device is not None:
        from llmq.devices import resolve_device

        device = resolve_device(device)
    in_memory = isinstance(model, torch.nn.Module)
    tokenizer = source = None
    if in_memory:
        if out_dir is not None:
            raise ValueError("out_dir needs the model's folder (for its tokenizer and files): pass the folder, or save "
                             "the quantized model with llmq.checkpoint.save_quantized")
        if quantizer.needs_calibration and calibration_ids is None:
            raise ValueError(f"{quantizer.desc} on a model in memory needs calibration_ids [nsamples, seqlen]")
    else:
        source = resolve_model_path(model)
        check_float_source(source)
        if out_dir is not None:
            check_output_dir(out_dir, force, source_dir=source)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    record = None
    if quantizer.needs_calibration:
        if calibration_ids is None:
            from llmq.calibration import calibration_batch, check_calibration_source

            calibration = calibration or CalibrationSpec()
            check_calibration_source(calibration.source)
            calibration_ids = calibration_batch(tokenizer, calibration)  # empty / too short: fails before any work
            record = calibration.to_dict()
        else:
            record = {"source": "calibration_ids", "nsamples": calibration_ids.shape[0],
                      "seqlen": calibration_ids.shape[-1]}
    if isinstance(recipe, WeightRecipe) and (recipe.method is not WeightMethod.RTN or recipe.method_args):
        args = {**quantizer.args, **({"calibration": record} if record else {})}
        weight_recipe = dataclasses.replace(recipe, method_args=args)
    q_model, summary = run_layerwise(model if in_memory else source, quantizer, calibration_ids, device,
                                     max_memory_mb, batch_size, progress, trust_remote_code)
    summary = _quantize_head(q_model, lm_head, summary)
    saved = None
    if out_dir is not None:
        extra = {} if lm_head is LmHead.FLOAT else {"lm_head": lm_head.value}
        if isinstance(recipe, ActivationRecipe):
            extra["activation"] = recipe.to_dict()
            extra["calibration"] = {**(record or {}), "sequential": True}
        qcfg = build_quantization_config(q_model, weight_recipe, extra or None)
        saved = save_quantized(q_model, tokenizer, out_dir, qcfg, force=force, source_dir=source)
    activation = recipe if isinstance(recipe, ActivationRecipe) else None
    return QuantizeResult(q_model, tokenizer, summary, saved, weight_recipe, activation)


def _quantizer(recipe, quantize_head: bool, exclude: tuple[str, ...], backend: str | None):
    """The layer quantizer for ``recipe`` and the weight recipe it runs (unknown method or arguments: now)."""
    if isinstance(recipe, ActivationRecipe):
        from llmq.w8a8.layerwise import W8A8Quantizer
        from llmq.w8a8.quantize import w8a8_weight_recipe

        if quantize_head:
            raise ValueError("lm_head applies to weight-only recipes; W8A8 keeps the output head in float")
        weight_recipe = w8a8_weight_recipe(exclude=DEFAULT_EXCLUDE + tuple(exclude))
        return W8A8Quantizer(recipe, weight_recipe, backend), weight_recipe
    if not isinstance(recipe, WeightRecipe):
        raise TypeError(f"recipe must be a WeightRecipe or an ActivationRecipe, got {type(recipe).__name__}")
    if exclude or backend is not None:
        raise ValueError("exclude and backend apply to W8A8 (ActivationRecipe); a WeightRecipe has its own exclude")
    from llmq.pipeline.layerwise import WeightQuantizer

    return WeightQuantizer(recipe), recipe


def _quantize_head(model, lm_head, summary):
    from llmq.model.lm_head import quantize_lm_head

    return quantize_lm_head(model, lm_head, summary)


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
