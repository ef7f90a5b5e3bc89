"""ONNX export with explicit QuantizeLinear/DequantizeLinear (TensorRT / onnxruntime), and an onnxruntime runner.

Needs the optional extra: ``pip install 'llmq[onnx]'`` (``onnx``, ``onnxruntime``).
See ``docs/ptq_onnx.md``.
"""

from llmq.onnx.export import OnnxExport, export_onnx
from llmq.onnx.runtime import OnnxCausalLM

__all__ = ["OnnxCausalLM", "OnnxExport", "export_onnx"]
