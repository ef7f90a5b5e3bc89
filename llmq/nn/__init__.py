"""Quantized modules and the backends that run them."""

from llmq.nn.backends import LinearSpec, available_backends, choose_backend, register_backend
from llmq.nn.quant_linear import QuantLinear
import llmq.nn.triton_backend  # noqa: E402,F401  registers the Triton backends (ahead of torch on CUDA)
from llmq.nn.w8a8_linear import W8A8Linear  # noqa: E402  registers module kind "w8a8_linear"


def set_backend(model, name: str | None) -> None:
    """Force backend ``name`` (``None`` = automatic) on every ``QuantLinear``/``W8A8Linear`` of ``model``."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, W8A8Linear)):
            module.set_backend(name)


__all__ = ["LinearSpec", "QuantLinear", "available_backends", "choose_backend", "register_backend", "set_backend", "W8A8Linear"]
