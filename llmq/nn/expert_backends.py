"""Backends that run ``QuantExperts`` (op kind ``experts`` of ``llmq.backend_choice``).

A backend is an object with::

    name: str
    can_implement(spec: ExpertsSpec) -> tuple[bool, str]
    forward(module, x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]

registered into ``llmq.backend_choice.EXPERTS``, which tries triton (CUDA, ``llmq.nn.triton_experts``)
then the pure-torch reference below (every spec, everywhere). A forced backend
(``QuantExperts(..., backend=)``, ``set_backend``, or ``LLMQ_BACKEND``) that cannot run a spec
raises with its reason instead of falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmq.backend_choice import EXPERTS

if TYPE_CHECKING:
    from llmq.nn.quant_experts import QuantExperts


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


EXPERTS.register(TorchExpertsBackend())


def route_tokens(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ``top_k_index`` ``[T, k]`` by expert.

    Returns ``(order, counts, offsets)``: ``order`` ``[T·k]`` int64 flat (token·k + slot) indices
    sorted by expert (stable, so tokens keep their order within an expert; indices outside
    ``[0, E)`` sort last and are not counted), ``counts`` ``[E]`` int64 pairs per expert, ``offsets``
    ``[E + 1]`` int64 start of each expert's run in ``order``.
    """
    flat = top_k_index.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, counts, offsets
