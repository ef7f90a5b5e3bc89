"""Quantized modules and the backends that run them (chosen by ``llmq.backend_choice``)."""

from llmq.nn.backends import LinearSpec, available_backends, choose_backend, register_backend
from llmq.nn.quant_linear import QuantLinear
import llmq.nn.cpu_backend  # noqa: E402,F401  registers the cpu backend (preferred over torch where it runs)
import llmq.nn.triton_backend  # noqa: E402,F401  registers triton (preferred on CUDA) and triton-interpret
from llmq.nn.w8a8_linear import W8A8Linear  # noqa: E402  registers module kind "w8a8_linear"
from llmq.nn.quant_experts import QuantExperts  # noqa: E402  registers module kind "quant_experts" (MoE)
import llmq.nn.triton_experts  # noqa: E402,F401  registers the grouped-experts Triton backends


def set_backend(model, name: str | None) -> None:
    """Force backend ``name`` (``None`` = automatic) on every ``QuantLinear``/``W8A8Linear``/``QuantExperts``."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, W8A8Linear, QuantExperts)):
            module.set_backend(name)


def prepare(model, dtype=None) -> None:
    """Choose every quantized module's backend for ``dtype`` activations (default: each module's
    ``activation_dtype_hint()``) on its device, and convert weights to the layout that backend reads.

    ``from_pretrained`` and ``.to()`` / ``.cuda()`` / ``.half()`` already do this; call it yourself
    before ``torch.compile`` when the model will run in another dtype than its bias (or torch's default), or after
    ``set_backend``. Raises ``ValueError`` when a module has no backend that can run it.
    """
    for module in model.modules():
        if isinstance(module, (QuantLinear, W8A8Linear)) and module.qweight.device.type != "meta":
            module.prepare(dtype)  # (meta = offloaded by accelerate: its first forward prepares it)


__all__ = ["LinearSpec", "QuantLinear", "available_backends", "choose_backend", "prepare", "register_backend", "set_backend", "W8A8Linear", "QuantExperts"]
