"""W8A8 model pipeline: calibration, SmoothQuant, activation observers, ``W8A8Linear`` swap."""

from llmq.w8a8.quantize import W8A8Summary, calibration_batches, quantize_model_w8a8, quantize_w8a8

__all__ = ["W8A8Summary", "calibration_batches", "quantize_model_w8a8", "quantize_w8a8"]
