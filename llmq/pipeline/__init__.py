"""Model-level driver: feed calibration activations to the algorithms one decoder layer at a time."""

from llmq.pipeline.layerwise import find_decoder_layers, quantize_layerwise, quantize_model
from llmq.pipeline.methods import METHOD_DEFAULTS, NEEDS_CALIBRATION, method_args

__all__ = ["METHOD_DEFAULTS", "NEEDS_CALIBRATION", "find_decoder_layers", "method_args", "quantize_layerwise",
           "quantize_model"]
