"""Fake-quantized Linears for quantization-aware training (QAT), with straight-through gradients.

The seed's QAT: put a quantize → dequantize ("fake quant") where the weights will be quantized and
train in that simulated mode, so the model adapts to the rounding it will live with. ``round`` has
no useful gradient; the straight-through estimator (STE) passes the gradient through it unchanged,
and the clamp to ``[0, Qmax]`` stops it for saturated weights (the clipped STE).

``FakeQuantLinear`` also learns its per-group scales (LSQ, Esser et al. 2020): with the STE the
gradient of ``ŵ = (clamp(round(w/s + z), 0, Qmax) − z)·s`` w.r.t. ``s`` is ``round(v) − v`` inside the
range and the clamp bound outside, which autograd gives as is. The zero points stay RTN's
integers, so ``to_quant_linear`` yields an ordinary integer-zero ``QuantLinear`` whose weight is
exactly the fake-quantized one (the scale is rounded to fp16 in the forward too, as stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import QuantizedWeight, check_finite, choose_qparams, qmax, quantize_with_params, to_groups

_MIN_SCALE = torch.finfo(torch.float16).tiny


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 values (as a checkpoint stores scales), identity backward."""
    return x + (x.to(torch.float16).float() - x).detach()


class FakeQuantizedLinear(nn.Module):
    """What every fake-quantized Linear shares: the latent float weight and bias, the learned per-group
    scales (rounded to fp16 in the forward, as a checkpoint stores them), the forward, and the exact
    conversion to the ``QuantLinear`` it simulates.

    Subclasses set ``self.scale`` (an ``[N, G]`` parameter) and implement ``fake_quantized_weight``
    (``[N, K]`` float32, differentiable) and ``quantized_weight`` (the codes that weight stands for).
    """

    def __init__(self, linear: nn.Linear, name: str) -> None:
        super().__init__()
        check_finite(linear.weight.data, name)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())

    def ste_scale(self) -> torch.Tensor:
        """``[N, G, 1]`` float32: the scales as stored (fp16, at least fp16's smallest normal), STE backward."""
        return fp16_ste(self.scale.clamp(min=_MIN_SCALE))[..., None]

    @torch.no_grad()
    def stored_scales(self) -> torch.Tensor:
        """``[N, G]`` float32 holding the fp16 values ``ste_scale`` computes with."""
        return self.scale.clamp(min=_MIN_SCALE).to(torch.float16).float()

    def fake_quantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized_weight(self) -> QuantizedWeight:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """A ``QuantLinear`` holding exactly the weight ``fake_quantized_weight`` gives."""
        return QuantLinear.from_quantized(self.quantized_weight(), None if self.bias is None else self.bias.detach())


class FakeQuantLinear(FakeQuantizedLinear):
    """An ``nn.Linear`` whose weight is fake-quantized group-wise in every forward.

    Parameters and buffers (K = in, N = out features, G = ceil(K / group_size), or 1 per channel)::

        weight  [N, K]  float32 parameter   the latent float weight (trained)
        scale   [N, G]  float32 parameter   per-group step size (trained; RTN's min-max scale at start)
        zero    [N, G]  float32 buffer      RTN's integer zero points (fixed; 2**(bits-1) if symmetric)
        bias    [N]     parameter or None   copied from the Linear (trained)

    Args:
        linear: the float Linear to wrap (its weight and bias are copied, not shared).
        bits, group_size, symmetric: the recipe the model will be quantized with.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool,
                 name: str = "weight") -> None:
        super().__init__(linear, name)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        scale, zero = choose_qparams(to_groups(self.weight.detach(), group_size), bits, symmetric)  # [N, G]
        self.scale = nn.Parameter(scale)
        self.register_buffer("zero", zero.float())

    def fake_quantized_weight(self) -> torch.Tensor:
        """``[N, K]`` float32: ``(clamp(round(w/s + z), 0, Qmax) − z)·s`` with STE gradients."""
        s = self.ste_scale()
        z = self.zero[..., None]
        groups = to_groups(self.weight, self.group_size)  # [N, G, g], zero-padded
        q = round_ste(groups / s + z).clamp(0, qmax(self.bits))
        return ((q - z) * s).reshape(self.out_features, -1)[:, : self.in_features]

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The integer codes and stored parameters this layer's forward simulates."""
        scales = self.stored_scales()
        zeros = self.zero.to(torch.int32)
        codes = quantize_with_params(self.weight, scales, zeros, self.bits, self.group_size)
        return QuantizedWeight(codes, scales, zeros, self.bits, self.group_size, self.symmetric)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
