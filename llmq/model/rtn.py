"""Deprecated: round-to-nearest of a whole in-memory model is ``llmq.quantize(model, WeightRecipe(...))``.

``QuantizationSummary`` and ``model_bytes`` now live in ``llmq.pipeline.summary`` (re-exported here).
"""

from __future__ import annotations

import warnings

from torch import nn

from llmq.pipeline.summary import QuantizationSummary, model_bytes  # noqa: F401  (re-exported)
from llmq.recipes import WeightRecipe


def quantize_model_rtn(model: nn.Module, recipe: WeightRecipe, progress: bool = True) -> QuantizationSummary:
    """Deprecated: ``llmq.quantize(model, recipe).summary`` — which this calls (the layer-wise driver, on
    the device the model is on; the same codes as before it became an alias)."""
    from llmq.api import quantize

    warnings.warn("llmq.model.rtn.quantize_model_rtn is deprecated: use llmq.quantize(model, recipe)",
                  DeprecationWarning, stacklevel=2)
    return quantize(model, recipe, progress=progress, device=str(next(model.parameters()).device)).summary
