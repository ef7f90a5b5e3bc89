"""Backends that run ``QuantExperts`` and the rule that picks one (the ``QuantLinear`` pattern, for MoE).

A backend is an object with::

    name: str
    can_implement(spec: ExpertsSpec) -> tuple[bool, str]
    forward(module, x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]

Tried in registration order (fastest first); the pure-torch backend is last and runs every
spec everywhere. A forced backend (``QuantExperts(..., backend=)``, ``set_backend``, or the
``LLMQ_BACKEND`` environment variable when it names an experts backend) that cannot run a spec
raises with its reason instead of falling back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmq.nn.backends import BACKEND_ENV

if TYPE_CHECKING:
    from llmq.nn.quant_experts import QuantExperts

logger = logging.getLogger("llmq")


@dataclass(frozen=True)
class ExpertsSpec:
    num_experts: int
    hidden_size: int
    intermediate_size: int
    bits: int
    group_size: int | None
    symmetric: bool
    zero_point: str | None
    device_type: str
    act_dtype: torch.dtype


class ExpertsBackend(Protocol):
    name: str

    def can_implement(self, spec: ExpertsSpec) -> tuple[bool, str]: ...

    def forward(self, module: "QuantExperts", x: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor: ...


class TorchExpertsBackend:
    """Reference: for each expert that received tokens, dequantize its two weights and run its tokens.

    Experts with no tokens cost nothing (their weights are never unpacked). One Python iteration
    per hit expert and a host sync for the counts: the always-correct path, not the fast one.
    """

    name = "torch"

    def can_implement(self, spec: ExpertsSpec) -> tuple[bool, str]:
        return True, "pure-torch reference runs every expert stack on every device"

    def forward(self, module, x, top_k_index, top_k_weights):
        from llmq.nn.quant_experts import route_tokens

        k = top_k_index.shape[1]
        order, counts, offsets = route_tokens(top_k_index, module.num_experts)
        flat_w = top_k_weights.reshape(-1)
        out = torch.zeros_like(x)
        for e in counts.nonzero().flatten().tolist():
            pairs = order[offsets[e]:offsets[e + 1]]
            tokens = pairs // k
            h = x[tokens] @ module.gate_up.dequantize(e).to(x.dtype)  # [t, 2I]
            gate, up = h.chunk(2, dim=-1)
            y = (module.act_fn(gate) * up) @ module.down.dequantize(e).to(x.dtype)  # [t, H]
            y = y * flat_w[pairs, None].to(y.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


_REGISTRY: list[ExpertsBackend] = []
_logged: set[tuple[str, str]] = set()


def register_experts_backend(backend: ExpertsBackend, *, first: bool = True) -> None:
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"an experts backend named {backend.name!r} is already registered")
    _REGISTRY.insert(0, backend) if first else _REGISTRY.append(backend)


def available_experts_backends() -> list[str]:
    return [b.name for b in _REGISTRY]


def choose_experts_backend(spec: ExpertsSpec, forced: str | None = None) -> ExpertsBackend:
    """The first registered backend that can run ``spec`` (or the forced one); raises with every reason."""
    env = os.environ.get(BACKEND_ENV) or None
    forced = forced or (env if env in available_experts_backends() else None)
    if forced is not None and forced not in available_experts_backends():
        raise ValueError(f"unknown experts backend {forced!r}: available are {available_experts_backends()}")
    candidates = [b for b in _REGISTRY if b.name == forced] if forced else list(_REGISTRY)
    reasons = []
    for backend in candidates:
        ok, reason = backend.can_implement(spec)
        if ok:
            if (backend.name, reason) not in _logged and not torch.compiler.is_compiling():
                _logged.add((backend.name, reason))
                logger.info("llmq: QuantExperts backend %r (%s)", backend.name, reason)
            return backend
        reasons.append(f"{backend.name}: {reason}")
    how = f"forced experts backend {forced!r}" if forced else "no registered experts backend"
    raise ValueError(f"{how} cannot run {spec}: " + "; ".join(reasons))


register_experts_backend(TorchExpertsBackend())
