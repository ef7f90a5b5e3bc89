"""W8A8 model pipeline: calibration, SmoothQuant, activation observers, ``W8A8Linear`` swap
(layer by layer from disk: ``quantize_layerwise_w8a8``; a model in memory: ``quantize_model_w8a8``)."""

from llmq.w8a8.layerwise import quantize_layerwise_w8a8
from llmq.w8a8.quantize import W8A8Summary, calibration_batches, quantize_model_w8a8, quantize_w8a8

__all__ = ["W8A8Summary", "calibration_batches", "quantize_layerwise_w8a8", "quantize_model_w8a8", "quantize_w8a8"]
