"""Quantized modules and the backends that run them."""

from llmq.nn.backends import LinearSpec, available_backends, choose_backend, register_backend
from llmq.nn.quant_linear import QuantLinear
import llmq.nn.triton_backend  # noqa: E402,F401  registers the Triton backends (ahead of torch on CUDA)


def set_backend(model, name: str | None) -> None:
    """Force backend ``name`` (``None`` = automatic) on every ``QuantLinear`` of ``model``."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.set_backend(name)


__all__ = ["LinearSpec", "QuantLinear", "available_backends", "choose_backend", "register_backend", "set_backend"]
