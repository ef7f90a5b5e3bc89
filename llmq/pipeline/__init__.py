"""Model-level driver: feed calibration activations to a layer quantizer one decoder layer at a time
(``llmq.pipeline.driver.run_layerwise``; the public entry point is ``llmq.quantize``)."""

from llmq.pipeline.capture import find_decoder_layers
from llmq.pipeline.driver import LayerCounts, LayerQuantizer, run_layerwise
from llmq.pipeline.layerwise import WeightQuantizer, quantize_layerwise, quantize_model
from llmq.pipeline.methods import METHOD_DEFAULTS, NEEDS_CALIBRATION, method_args
from llmq.pipeline.summary import QuantizationSummary

__all__ = ["METHOD_DEFAULTS", "NEEDS_CALIBRATION", "LayerCounts", "LayerQuantizer", "QuantizationSummary",
           "WeightQuantizer", "find_decoder_layers", "method_args", "quantize_layerwise", "quantize_model",
           "run_layerwise"]
