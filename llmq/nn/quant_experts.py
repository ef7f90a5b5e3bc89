"""``QuantExperts``: a weight-only quantized drop-in for transformers' fused-expert modules (MoE).

A fused-experts module (``MixtralExperts``, ``Qwen3MoeExperts``, …; see ``llmq.moe.families``)
holds ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. ``QuantExperts`` holds the same
weights as two ``QuantExpertLinear`` stacks, each expert packed exactly like one ``QuantLinear``,
and keeps the module's ``forward(hidden_states, top_k_index, top_k_weights)`` contract, so the
MoE block (and its float router) calls it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.backend_choice import EXPERTS, ChoosesBackend
from llmq.nn.backends import QuantizedBuffers
from llmq.nn.expert_backends import ExpertsSpec, route_tokens  # noqa: F401  (route_tokens: public here too)
from llmq.nn.registry import register_module_kind
from llmq.quant.packing import pack, packed_rows, unpack
from llmq.quant.primitives import SCALE_DTYPE, QuantizedWeight, effective_group_size, num_groups
from llmq.recipes import SUPPORTED_GROUP_SIZES, SUPPORTED_WEIGHT_BITS


class QuantExpertLinear(QuantizedBuffers, nn.Module):
    """E quantized Linears ``K -> N`` stacked on a leading expert axis, each in ``QuantLinear``'s layout.

    Buffers (E = experts, P = codes per int32 word, G = ceil(K / group_size), or 1 per channel)::

        qweight  [E, ceil(K / P), N]  int32    expert e's codes packed along K (= QuantLinear.qweight)
        scales   [E, G, N]            float16
        qzeros   [E, G, N]            uint8    integer zero points (zero_point="int"); absent when symmetric
        zeros    [E, G, N]            float16  float zero points instead (zero_point="float", HQQ-style)

    ``W_e[n, k] = (code[e, k, n] - zero[e, k // g, n]) * scales[e, k // g, n]``. Scales and float
    zeros keep their fp16 values through a ``.bfloat16()`` cast (``QuantizedBuffers._apply``).
    """

    FP16_VALUED_BUFFERS = ("scales", "zeros")

    def __init__(self, num_experts: int, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool, zero_point: str = "int", device=None) -> None:
        super().__init__()
        if bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(f"unsupported weight bits {bits}: choose one of {SUPPORTED_WEIGHT_BITS}")
        if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group size {group_size}: choose one of {SUPPORTED_GROUP_SIZES} or None")
        if zero_point not in ("int", "float"):
            raise ValueError(f"unknown zero_point {zero_point!r}: choose 'int' or 'float'")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.zero_point = None if symmetric else zero_point
        g = num_groups(in_features, group_size)
        e, n = num_experts, out_features
        self.register_buffer("qweight", torch.zeros(e, packed_rows(in_features, bits), n, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(e, g, n, dtype=SCALE_DTYPE, device=device))
        for name, dtype in (("qzeros", torch.uint8 if self.zero_point == "int" else None),
                            ("zeros", SCALE_DTYPE if self.zero_point == "float" else None)):
            if dtype is None:
                setattr(self, name, None)
            else:
                self.register_buffer(name, torch.zeros(e, g, n, dtype=dtype, device=device))

    @property
    def zero_points(self) -> torch.Tensor | None:
        return self.qzeros if self.qzeros is not None else self.zeros

    @classmethod
    def from_quantized(cls, qws: list[QuantizedWeight]) -> "QuantExpertLinear":
        """Pack one ``QuantizedWeight`` (``[N, K]`` codes) per expert; all must share shape and recipe."""
        first = qws[0]
        n, k = first.shape
        for e, qw in enumerate(qws):
            if (qw.shape, qw.bits, qw.group_size, qw.symmetric, qw.float_zeros) != (
                    first.shape, first.bits, first.group_size, first.symmetric, first.float_zeros):
                raise ValueError(f"expert {e} was quantized as {qw.shape} {qw.bits}-bit group {qw.group_size}, "
                                 f"expert 0 as {first.shape} {first.bits}-bit group {first.group_size}: "
                                 "every expert of a stack needs the same shape and recipe")
        stack = cls(len(qws), k, n, first.bits, first.group_size, first.symmetric,
                    zero_point="float" if first.float_zeros else "int", device=first.codes.device)
        for e, qw in enumerate(qws):
            stack.qweight[e] = pack(qw.codes.t(), qw.bits)
            stack.scales[e] = qw.scales.t().to(SCALE_DTYPE)
            if stack.qzeros is not None:
                stack.qzeros[e] = qw.zeros.t().to(torch.uint8)
            if stack.zeros is not None:
                stack.zeros[e] = qw.zeros.t().to(SCALE_DTYPE)
        return stack

    def dequantize(self, experts: torch.Tensor | int) -> torch.Tensor:
        """Float32 ``[len(experts), K, N]`` weights (``[K, N]`` for an int), transposed w.r.t. ``nn.Linear``."""
        single = isinstance(experts, int)
        idx = torch.as_tensor([experts] if single else experts, device=self.qweight.device)
        k, g = self.in_features, effective_group_size(self.in_features, self.group_size)
        scales = self.scales[idx].float()  # [e, G, N]
        n_groups, n = scales.shape[1:]
        words = self.qweight[idx]
        codes = torch.stack([unpack(w, self.bits, k) for w in words])  # [e, K, N] uint8
        codes = nn.functional.pad(codes, (0, 0, 0, n_groups * g - k)).float().view(len(idx), n_groups, g, n)
        zeros = self.zero_points
        zeros = zeros[idx].float()[:, :, None, :] if zeros is not None else float(1 << (self.bits - 1))
        w = ((codes - zeros) * scales[:, :, None, :]).view(len(idx), n_groups * g, n)[:, :k]
        return w[0] if single else w

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                **({"zero_point": "float"} if self.zero_point == "float" else {})}

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={g}, symmetric={self.symmetric}")


@register_module_kind
class QuantExperts(ChoosesBackend, nn.Module):
    """Quantized fused experts: ``y[t] = Σ_j w[t,j] · down_e(act(gate_e(x[t])) · up_e(x[t]))``.

    Submodules::

        gate_up  QuantExpertLinear  E x (H -> 2I)   output columns [gate | up], as gate_up_proj's rows
        down     QuantExpertLinear  E x (I -> H)

    ``forward(hidden_states [T, H], top_k_index [T, k] int, top_k_weights [T, k]) -> [T, H]`` in the
    dtype of ``hidden_states``; indices outside ``[0, E)`` are skipped (transformers' expert-parallel
    convention for experts another rank holds). The backend (``llmq.backend_choice.EXPERTS``: triton ->
    torch, ``llmq.nn.expert_backends``) is chosen per (device, dtype) on first use; ``backend=`` /
    ``set_backend`` / ``LLMQ_BACKEND`` force one.
    """

    KIND = "quant_experts"
    BACKENDS = EXPERTS

    def __init__(self, gate_up: QuantExpertLinear, down: QuantExpertLinear, act_fn: nn.Module,
                 experts_class: str, backend: str | None = None) -> None:
        super().__init__()
        if gate_up.num_experts != down.num_experts:
            raise ValueError(f"gate_up has {gate_up.num_experts} experts but down has {down.num_experts}")
        if gate_up.out_features != 2 * down.in_features or gate_up.in_features != down.out_features:
            raise ValueError(f"gate_up is {gate_up.in_features}->{gate_up.out_features} but down is "
                             f"{down.in_features}->{down.out_features}; expected H->2I and I->H")
        self.gate_up, self.down, self.act_fn = gate_up, down, act_fn
        self.num_experts = gate_up.num_experts
        self.hidden_dim, self.intermediate_dim = down.out_features, down.in_features
        self.experts_class = experts_class
        self.backend_name = backend
        self._backend: dict = {}

    # -- checkpoint description (llmq.nn.registry) ------------------------------------------------
    def to_config(self) -> dict:
        return {"kind": self.KIND, "experts_class": self.experts_class, "num_experts": self.num_experts,
                "hidden_size": self.hidden_dim, "intermediate_size": self.intermediate_dim, **self.gate_up.config()}

    @classmethod
    def empty_like(cls, experts: nn.Module, cfg: dict, device=None) -> "QuantExperts":
        """An empty ``QuantExperts`` for the float experts module ``experts`` as ``cfg`` (``to_config``) describes.

        Raises ``ValueError`` when the module's class or shape differs from the checkpoint's record.
        """
        from llmq.moe.families import family_of

        family = family_of(experts)
        e, two_i, h = getattr(experts, family.gate_up).shape
        got = {"experts_class": type(experts).__name__, "num_experts": e, "hidden_size": h,
               "intermediate_size": two_i // 2}
        want = {k: cfg.get(k) for k in got}
        if got != want:
            diff = ", ".join(f"{k} {want[k]} in the checkpoint vs {got[k]} in the model" for k in got if got[k] != want[k])
            raise ValueError(f"checkpoint experts do not match the model's {type(experts).__name__}: {diff}; "
                             "config.json and the weights do not match")
        recipe = dict(bits=cfg["bits"], group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                      zero_point=cfg.get("zero_point", "int"), device=device)
        return cls(QuantExpertLinear(e, h, two_i, **recipe), QuantExpertLinear(e, two_i // 2, h, **recipe),
                   getattr(experts, family.act), type(experts).__name__)

    @classmethod
    def from_config(cls, *args, **kwargs):  # registry protocol: experts are built with ``empty_like``
        raise TypeError("QuantExperts replaces a fused-experts module, not an nn.Linear: use QuantExperts.empty_like")

    # -- running ---------------------------------------------------------------------------------
    def spec(self, x: torch.Tensor) -> ExpertsSpec:
        g = self.gate_up
        return ExpertsSpec(self.num_experts, self.hidden_dim, self.intermediate_dim, g.bits, g.group_size,
                           g.symmetric, g.zero_point, x.device.type, x.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"QuantExperts expects hidden_states [T, {self.hidden_dim}], got "
                             f"{tuple(hidden_states.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                             f"{tuple(top_k_weights.shape)} must both be [T={hidden_states.shape[0]}, k]")
        return self.backend_for(hidden_states).forward(self, hidden_states, top_k_index, top_k_weights)

    def storage_bytes(self) -> int:
        return self.gate_up.storage_bytes() + self.down.storage_bytes()

    def extra_repr(self) -> str:
        return f"experts_class={self.experts_class}"
