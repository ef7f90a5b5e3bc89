"""Quantization-aware training: fake-quantized Linears (STE, learned scales), distillation from
the float model, conversion to packed ``QuantLinear``s.

    from llmq.qat import prepare_qat, distill, convert_qat
    prepare_qat(student, WeightRecipe(bits=3, group_size=64))
    distill(student, teacher, calibration_windows, steps=180)
    convert_qat(student)          # now an ordinary llmq-quantized model: save_quantized(...) it
"""

from llmq.qat.distill import DistillResult, distill
from llmq.qat.fake_levels import FakeLevelsLinear
from llmq.qat.fake_quant import FakeQuantLinear, FakeQuantizedLinear, fp16_ste, round_ste
from llmq.qat.prepare import convert_qat, prepare_qat, qat_parameters

__all__ = ["DistillResult", "FakeLevelsLinear", "FakeQuantLinear", "FakeQuantizedLinear", "convert_qat", "distill", "fp16_ste", "prepare_qat",
           "qat_parameters", "round_ste"]
