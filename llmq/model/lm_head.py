"""Quantizing the output head (``lm_head``), tied or not, as an opt-in step after the decoder layers.

The head is kept in float by default (``WeightRecipe``'s ``DEFAULT_EXCLUDE``): it is the layer whose
rounding reaches the logits directly. On a small model it is also the largest single matmul
(SmolLM2-135M: 49152 x 576, 21 % of the parameters), so on a CPU, where decode time follows the bytes
read, a float head caps what quantizing the rest can gain (``docs/cpu_backend.md``).

``--lm-head`` / ``quantize(..., lm_head=...)`` picks one of ``HEAD_FORMATS``, always round-to-nearest
(whatever ``--method`` quantizes the decoder layers with: calibrated methods walk decoder layers only):

* ``int8``: 8-bit, one scale per output row, symmetric: the cpu backend's single
  ``_weight_int8pack_mm`` call, and near-lossless (``docs/cpu_backend.md`` gives the perplexity);
* ``int4``: 4-bit, groups of 64, integer zero points: the int4 kernel; a visible quality cost.

A **tied** head (``tie_word_embeddings``: the head's weight *is* the input embedding) is untied: the
embedding keeps its float tensor, untouched, and the head becomes a ``QuantLinear`` of its own; the
model's config says ``tie_word_embeddings = False``, so the saved checkpoint loads through plain
``from_pretrained`` (after ``import llmq``) without transformers re-tying a tensor the head no
longer has. The price: the checkpoint stores the embedding *and* the packed head (+ 1 byte per
weight at int8, about 0.5 at int4), where the float tied model stored the one tensor once.
"""

from __future__ import annotations

import dataclasses
from enum import Enum

import torch
from torch import nn

from llmq.pipeline.summary import QuantizationSummary, model_bytes
from llmq.model.swap import set_submodule
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import quantize_weight


class LmHead(str, Enum):
    """What becomes of the output head; the values are the CLI spellings and the JSON values."""

    FLOAT = "float"  # kept as the model's nn.Linear (the default: nothing changes)
    INT8 = "int8"
    INT4 = "int4"


# (bits, group_size, symmetric) per quantized choice; group_size None = one group per output row
HEAD_FORMATS = {LmHead.INT8: (8, None, True), LmHead.INT4: (4, 64, False)}


def lm_head_choice(value: LmHead | str) -> LmHead:
    """``value`` as an ``LmHead``; ``ValueError`` listing the choices when it is none of them."""
    try:
        return LmHead(value)
    except ValueError:
        raise ValueError(f"unknown lm_head choice {value!r}: choose one of {[c.value for c in LmHead]}") from None


def head_name(model: nn.Module) -> str:
    """Module name of ``model``'s output head (``get_output_embeddings()``), e.g. ``"lm_head"``.

    Raises ``ValueError`` when the model has no output head or it is not an ``nn.Linear``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"--lm-head needs a model whose output head is an nn.Linear; "
                         f"{type(model).__name__} has {type(head).__name__}")
    return next(name for name, m in model.named_modules() if m is head)


def _untie(model: nn.Module, name: str) -> None:
    """Make the config and transformers' tie map say the head is no longer tied to the embedding."""
    configs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        text = model.config.get_text_config()
        configs[id(text)] = text
    for cfg in configs.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: {target: source}, read at save/load
    if isinstance(tied, dict):
        for key in [k for k, v in tied.items() if k.startswith(f"{name}.") or v.startswith(f"{name}.")]:
            tied.pop(key)


@torch.no_grad()
def quantize_lm_head(model: nn.Module, choice: LmHead | str,
                     summary: QuantizationSummary | None = None) -> QuantizationSummary | None:
    """Replace ``model``'s output head by a round-to-nearest ``QuantLinear`` in format ``HEAD_FORMATS[choice]``.

    ``choice`` ``"float"`` leaves the model as it is. A tied head is untied first (module docstring):
    the input embedding's tensor is only read. Returns ``summary`` with the head added to its counts
    (``None`` stays ``None``). Raises ``ValueError`` for an unknown choice, a head already quantized,
    or a model without an ``nn.Linear`` head.
    """
    choice = lm_head_choice(choice)
    if choice is LmHead.FLOAT:
        return summary
    if isinstance(model.get_output_embeddings(), QuantLinear):
        raise ValueError("the output head is already quantized; quantize it once")
    name = head_name(model)
    head = model.get_submodule(name)
    bits, group_size, symmetric = HEAD_FORMATS[choice]
    qw = quantize_weight(head.weight.data, bits, group_size, symmetric, name=name)  # reads; never writes
    qhead = QuantLinear.from_quantized(qw, head.bias)
    _untie(model, name)
    set_submodule(model, name, qhead)
    if summary is None:
        return None
    params = summary.quantized_params + head.weight.numel()
    after = summary.linear_mb_after + qhead.storage_bytes() / 1e6
    return dataclasses.replace(
        summary, linears=summary.linears + 1, quantized_params=params,
        linear_mb_before=summary.linear_mb_before + head.weight.numel() * head.weight.element_size() / 1e6,
        linear_mb_after=after, bits_per_weight=8 * after * 1e6 / params, model_mb_after=model_bytes(model) / 1e6)
