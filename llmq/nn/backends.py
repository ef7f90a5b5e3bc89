"""Matmul backends for ``QuantLinear`` and the rule that picks one.

A backend is an object with::

    name: str
    layout: str                     # the qweight layout it reads (llmq.nn.layouts); the layer converts
    layout_for(bits, group_size) -> str   # optional: when the layout depends on the layer (cpu)
    can_implement(spec: LinearSpec) -> tuple[bool, str]   # (ok, reason when not ok)
    forward(layer, x) -> Tensor     # y = x @ dequant(W).T + bias, qweight already in ``layout``

Backends are tried in registration order (fastest first); the pure-torch backend
is registered last and implements every spec on every device, so a choice always
exists — but a *forced* backend that cannot implement a spec raises with every
reason instead of silently falling back. Force one with ``QuantLinear(...,
backend="torch")``, ``llmq.nn.set_backend(model, "torch")`` or the environment
variable ``LLMQ_BACKEND``. The choice is logged once per (backend, reason).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmq.nn.layouts import CANONICAL
from llmq.quant.packing import unpack

if TYPE_CHECKING:
    from llmq.nn.quant_linear import QuantLinear

logger = logging.getLogger("llmq")

BACKEND_ENV = "LLMQ_BACKEND"


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


class LinearBackend(Protocol):
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
    codes = torch.nn.functional.pad(codes, (0, 0, 0, n_groups * g - k)).float().view(n_groups, g, n)
    if layer.zero_points is not None:  # uint8 integer or float zero points
        zeros = layer.zero_points.float()[:, None, :]
    else:
        zeros = float(1 << (layer.bits - 1))
    w = (codes - zeros) * layer.scales.float()[:, None, :]
    return w.view(n_groups * g, n)[:k]


_REGISTRY: list[LinearBackend] = []


# dtypes that hold every float16 value exactly
EXACT_FOR_FP16 = (torch.float16, torch.float32, torch.float64)


class BackendChoice:
    """Mixin for quantized Linears: the backend is chosen per (device type, dtype) on first use and cached.

    The module sets ``backend_name`` (a forced name, or ``None``) and ``_backend = {}`` in ``__init__``
    and implements ``_choose_backend(x)``.

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

    def _choose_backend(self, x: torch.Tensor):
        raise NotImplementedError

    def backend_for(self, x: torch.Tensor):
        key = (x.device.type, x.dtype)
        backend = self._backend.get(key)
        if backend is None:
            backend = self._backend[key] = self._choose_backend(x)
        return backend

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

    def set_backend(self, name: str | None) -> None:
        """Force a backend by name (``None`` = automatic choice); takes effect at the next forward."""
        self.backend_name = name
        self._backend.clear()

    def storage_bytes(self) -> int:
        """Bytes of all buffers as stored (packed codes, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def register_backend(backend: LinearBackend, *, first: bool = True) -> None:
    """Add a backend; ``first=True`` puts it ahead of the existing ones (preferred)."""
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    if first:
        _REGISTRY.insert(0, backend)
    else:
        _REGISTRY.append(backend)


def available_backends() -> list[str]:
    return [b.name for b in _REGISTRY]


def get_backend(name: str) -> LinearBackend:
    for b in _REGISTRY:
        if b.name == name:
            return b
    raise ValueError(f"unknown backend {name!r}: available backends are {available_backends()}")


_logged: set[tuple[str, str]] = set()


def choose_backend(spec: LinearSpec, forced: str | None = None) -> LinearBackend:
    """The first registered backend that can implement ``spec`` (or the forced one).

    Raises ``ValueError`` listing every backend's reason when none fits, or when the
    forced backend cannot implement the spec.
    """
    forced = forced or os.environ.get(BACKEND_ENV) or None
    candidates = [get_backend(forced)] if forced else list(_REGISTRY)
    reasons = []
    for backend in candidates:
        ok, reason = backend.can_implement(spec)
        if ok:
            key = (backend.name, reason)
            # not while torch.compile traces (dynamo cannot trace logging); ``prepare`` logs it eagerly
            if key not in _logged and not torch.compiler.is_compiling():
                _logged.add(key)
                logger.info("llmq: QuantLinear backend %r (%s)", backend.name, reason)
            return backend
        reasons.append(f"{backend.name}: {reason}")
    how = f"forced backend {forced!r}" if forced else "no registered backend"
    raise ValueError(f"{how} cannot run {spec}: " + "; ".join(reasons))


register_backend(TorchBackend())
