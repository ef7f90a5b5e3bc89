"""Fake-quantized Linears on non-linear levels (binary, nf, log2, kmeans) for QAT, with straight-through
gradients.

The uniform ``FakeQuantLinear`` rounds to the integer grid; this one rounds each weight to the nearest
entry of a codebook row, times a learned per-group scale, exactly as ``llmq.quant.levels`` stores it::

    v = w / s                       (s: the group's scale, rounded to fp16 as stored)
    ŵ = codebook[nearest(v)] · s    (binary: sign(w) · s)

The straight-through estimator treats ``codebook[nearest(v)]`` as ``v`` clamped to the table's range
``[c_min, c_max]`` (for binary ``[-1, 1]``: BinaryConnect's clipped STE, Courbariaux et al. 2015), so
the weight's gradient is 1 inside the range and 0 beyond it, and the scale's gradient is LSQ's
(Esser et al. 2020): ``c − v`` inside, the clamp bound outside. The codebook itself is fixed during
training (nf/log2/binary tables; a kmeans table fitted data-free at ``prepare_qat``): what trains are
the latent weights and the scales, as with uniform QAT.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.qat.fake_quant import FakeQuantizedLinear
from llmq.quant.levels import level_codes, level_params, lookup, nearest_level
from llmq.quant.primitives import QuantizedWeight, to_groups
from llmq.recipes import Levels


class FakeLevelsLinear(FakeQuantizedLinear):
    """An ``nn.Linear`` whose weight is fake-quantized to non-linear levels in every forward.

    Parameters and buffers (K = in, N = out features, G = ceil(K / group_size), or 1 per channel,
    T = 1 for shared tables or N for kmeans, L = 2**bits)::

        weight    [N, K]  float32 parameter   the latent float weight (trained)
        scale     [N, G]  float32 parameter   per-group scale (trained; the RTN level scale at start)
        codebook  [T, L]  float32 buffer      ascending fp16-valued levels (fixed)
        bias      [N]     parameter or None   copied from the Linear (trained)

    Args:
        linear: the float Linear to wrap (its weight and bias are copied, not shared).
        levels: ``Levels`` kind other than uniform; bits: its width (1 for binary).
        group_size: scale groups along K (``None`` = per channel).
    """

    def __init__(self, linear: nn.Linear, levels: Levels | str, bits: int, group_size: int | None,
                 name: str = "weight") -> None:
        if Levels(levels) is Levels.UNIFORM:
            raise ValueError(f"{name}: FakeLevelsLinear is for non-uniform levels; uniform QAT is FakeQuantLinear")
        super().__init__(linear, name)
        self.levels, self.bits, self.group_size = Levels(levels), bits, group_size
        scale, codebook = level_params(self.weight.detach(), self.levels, bits, group_size)  # data-free start, as RTN
        self.scale = nn.Parameter(scale)
        self.register_buffer("codebook", codebook.float().contiguous())

    def fake_quantized_weight(self) -> torch.Tensor:
        """``[N, K]`` float32: ``codebook[nearest(w/s)] · s`` with clipped-STE / LSQ gradients."""
        n = self.out_features
        s = self.ste_scale()  # [N, G, 1]
        v = to_groups(self.weight, self.group_size) / s  # [N, G, g], zero-padded
        lo = self.codebook[:, :1, None]  # [T, 1, 1]: the table's range, per row for kmeans
        hi = self.codebook[:, -1:, None]
        inside = torch.minimum(torch.maximum(v, lo), hi)
        flat = v.detach().reshape(n, -1)
        level = lookup(nearest_level(flat, self.codebook), self.codebook).view_as(v)
        q = level + (inside - inside.detach())  # value: exactly the level (no rounding); gradient: inside's
        return (q * s).reshape(n, -1)[:, : self.in_features]

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The level codes, scales and codebook this layer's forward simulates."""
        scales = self.stored_scales()
        codes = level_codes(self.weight, scales, self.codebook, self.group_size)
        return QuantizedWeight(codes, scales, None, self.bits, self.group_size, True,
                               codebook=self.codebook.clone(), levels=self.levels.value)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, levels={self.levels.value}, "
                f"bits={self.bits}, group_size={self.group_size}")
