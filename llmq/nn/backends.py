"""Weight-only matmul backends for ``QuantLinear`` (op kind ``weight-matmul`` of ``llmq.backend_choice``).

A backend is an object with::

    name: str
    layout: str                     # the qweight layout it reads (llmq.nn.layouts); the layer converts
    layout_for(bits, group_size) -> str   # optional: when the layout depends on the layer (cpu)
    can_implement(spec: LinearSpec) -> tuple[bool, str]   # (ok, reason when not ok)
    forward(layer, x) -> Tensor     # y = x @ dequant(W).T + bias, qweight already in ``layout``

registered with ``register_backend`` into ``llmq.backend_choice.WEIGHT_MATMUL``, which picks one in
the order triton (CUDA) -> cpu (torch's CPU kernels) -> torch (the reference, registered here, runs
every spec on every device); ``triton-interpret`` only when forced. Force one with
``QuantLinear(..., backend="torch")``, ``llmq.nn.set_backend(model, "torch")`` or ``LLMQ_BACKEND``;
a forced backend that cannot run a spec raises with its reason (see ``llmq.backend_choice``).
This module also holds ``BackendChoice``, what every quantized Linear shares: the cached choice,
eager ``prepare``, and scales kept exact through dtype casts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmq.backend_choice import BACKEND_ENV, WEIGHT_MATMUL, ChoosesBackend
from llmq.nn.layouts import CANONICAL
from llmq.quant.packing import unpack

if TYPE_CHECKING:
    from llmq.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class LinearSpec:
    """Everything a backend needs to decide whether it can run a layer on an input."""

    in_features: int
    out_features: int
    bits: int
    group_size: int | None
    symmetric: bool
    device_type: str  # "cpu", "cuda", ...
    act_dtype: torch.dtype
    levels: str = "uniform"  # llmq.quant.levels: non-uniform layers dequantize through layer.codebook


class LinearBackend(Protocol):
    """A way to run ``QuantLinear``'s matmul. Two optional methods, looked up with ``getattr``:
    ``layout_for(bits, group_size) -> str`` when the qweight layout it reads depends on the scheme
    (cpu), and ``hold_inputs(layer)``, run when a layer is prepared for it, to build what it derives
    from the buffers ahead of the first forward (cpu: the kernel's bf16 scales, needed inside
    ``torch.compile``)."""

    name: str
    layout: str

    def can_implement(self, spec: LinearSpec) -> tuple[bool, str]: ...

    def forward(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """Reference backend: unpack + dequantize the whole weight, then ``x @ W.T``.

    Runs anywhere (CPU and CUDA) in the activation dtype; materialises the float
    weight for the duration of the call, so it is the slow, always-correct path.
    """

    name = "torch"
    layout = CANONICAL

    def can_implement(self, spec: LinearSpec) -> tuple[bool, str]:
        return True, "pure-torch reference runs every layer on every device"

    def forward(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        w = dequantize_packed(layer).to(x.dtype)  # [K, N]
        y = x @ w
        if layer.bias is not None:
            y = y + layer.bias.to(x.dtype)
        return y


def dequantize_packed(layer: "QuantLinear") -> torch.Tensor:
    """Float32 ``[K, N]`` weight (transposed w.r.t. ``nn.Linear``) from a layer's buffers."""
    k, g = layer.in_features, layer.effective_group_size
    n_groups, n = layer.scales.shape
    codes = unpack(layer.canonical_qweight(), layer.bits, k)  # [K, N] uint8
    # view as [G, g, N] (zero-padding the short last group) so scales/zeros broadcast
    # per group instead of being gathered into a [K, N] tensor
    codes = torch.nn.functional.pad(codes, (0, 0, 0, n_groups * g - k))
    if layer.codebook is not None:  # non-uniform levels: w = codebook[0 or n, code] * scale
        cb = layer.codebook.float()  # [T, L]
        values = cb[0][codes.long()] if cb.shape[0] == 1 else cb.t().gather(0, codes.long())  # [K', N]
        w = values.view(n_groups, g, n) * layer.scales.float()[:, None, :]
        return w.view(n_groups * g, n)[:k]
    codes = codes.float().view(n_groups, g, n)
    if layer.zero_points is not None:  # uint8 integer or float zero points
        zeros = layer.zero_points.float()[:, None, :]
    else:
        zeros = float(1 << (layer.bits - 1))
    w = (codes - zeros) * layer.scales.float()[:, None, :]
    return w.view(n_groups * g, n)[:k]


# dtypes that hold every float16 value exactly
EXACT_FOR_FP16 = (torch.float16, torch.float32, torch.float64)


class QuantizedBuffers:
    """Mixin for modules holding quantized buffers (``QuantLinear``, ``W8A8Linear``, an experts stack).

    Buffers named in ``FP16_VALUED_BUFFERS`` hold fp16-representable quantization parameters
    (scales, float zeros): a dtype cast of the model that would round them (``.bfloat16()``) leaves
    them in their dtype (``_apply``); casts to fp16 / fp32 are exact and apply.
    """

    FP16_VALUED_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.FP16_VALUED_BUFFERS if getattr(self, name) is not None}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype not in EXACT_FOR_FP16:  # the cast rounded the values: keep them, on the new device
                self.register_buffer(name, before.to(device=after.device))
        return result

    def storage_bytes(self) -> int:
        """Bytes of the module as a checkpoint stores it (packed codes, scales, zeros, codebook, bias): its
        ``state_dict``, so codes held in a backend's layout (e.g. int3 in the cpu backend's 4-bit
        containers, ``llmq.nn.layouts``) count in the canonical packing they are saved in."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class BackendChoice(QuantizedBuffers, ChoosesBackend):
    """Mixin for quantized Linears: quantized buffers (``QuantizedBuffers``) and a backend chosen per
    (device type, dtype) on first use and cached (``llmq.backend_choice.ChoosesBackend``: the class sets
    ``BACKENDS`` and defines ``spec(x)``), or eagerly with ``prepare``.
    """

    def prepare(self, dtype: torch.dtype | None = None) -> None:
        """Choose the backend for activations of ``dtype`` on this module's device now, eagerly.

        ``dtype`` defaults to ``activation_dtype_hint()``. Done by ``llmq.nn.prepare(model)``, which
        ``from_pretrained`` and ``.to()`` / ``.cuda()`` / ``.half()`` run, so that a first forward
        inside ``torch.compile`` finds its backend chosen and its weights in the layout that backend
        reads. Raises ``ValueError`` (with every backend's reason) when no backend can run.
        """
        weight = self.qweight
        dtype = dtype or self.activation_dtype_hint()
        example = torch.empty(0, self.in_features, device=weight.device, dtype=dtype)  # no data: only the spec
        self._hold_inputs_of(self.backend_for(example))

    def activation_dtype_hint(self) -> torch.dtype:
        """The activation dtype ``prepare`` assumes when given none."""
        return torch.get_default_dtype()

    def _hold_inputs_of(self, backend) -> None:
        """Put the buffers in the form ``backend`` reads (nothing to do unless a module overrides it)."""


# the weight-matmul registry's own methods, under the names llmq.nn has always exported
register_backend = WEIGHT_MATMUL.register  # (backend, *, first=True): a new name goes first in the preference
available_backends = WEIGHT_MATMUL.names
get_backend = WEIGHT_MATMUL.get
choose_backend = WEIGHT_MATMUL.choose  # (spec, forced=None) -> backend; raises ValueError with the reasons

register_backend(TorchBackend())
__all__ = ["BACKEND_ENV", "BackendChoice", "LinearBackend", "LinearSpec", "QuantizedBuffers", "TorchBackend",
           "available_backends", "choose_backend", "dequantize_packed", "get_backend", "register_backend"]
