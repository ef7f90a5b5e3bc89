"""The optional ``onnx`` / ``onnxruntime`` imports, with the pip extra named when missing."""

from __future__ import annotations


def require_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'llmq[onnx]'") from e
    return onnx


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running the exported model needs 'onnxruntime': pip install 'llmq[onnx]'") from e
    return onnxruntime
