"""W8A8: the layer quantizer (``llmq.w8a8.layerwise.W8A8Quantizer``: SmoothQuant, observers, ``W8A8Linear``
swap) that ``llmq.quantize`` runs for an ``ActivationRecipe``, and the hooks it shares with ``llmq.ptq``.
The other names here are deprecated aliases (see ``llmq.w8a8.quantize``)."""

from llmq.w8a8.layerwise import W8A8Quantizer, quantize_layerwise_w8a8
from llmq.w8a8.quantize import W8A8Summary, calibration_batches, quantize_model_w8a8, quantize_w8a8

__all__ = ["W8A8Quantizer", "W8A8Summary", "calibration_batches", "quantize_layerwise_w8a8", "quantize_model_w8a8",
           "quantize_w8a8"]
