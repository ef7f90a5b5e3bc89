"""Round-to-nearest with a clipping search: shrink each group's range where that lowers the error.

Plain RTN (``llmq.quant.primitives.quantize_weight``) spends its levels on the
group's full ``[min, max]``; one outlier stretches the step for every other
weight. Clipping the range trades a large error on the few clipped weights for
a finer step everywhere else. Two ways to pick the clip, both data free:

* ``"mse"`` (GPTQ's reference ``Quantizer(mse=True)``): for every group try the
  ranges ``[f·min, f·max]`` for ``f`` on a grid from 1 down to ``1 - max_shrink``
  and keep, per group, the ``f`` whose dequantized weights have the least
  ``Σ |w - ŵ|^norm`` (``norm=2.4`` weights large errors a little more than MSE).
  ``f = 1`` is on the grid, so the result is never worse than RTN in that norm.
  An optional ``hessian`` (diagonal blocks ``[G, g, g]`` of ``XᵀX``) turns the
  error into the output error ``dᵀ H_g d`` of the group (AWQ's clip search).
* ``"percentile"``: range = the ``[p, 100-p]`` percentiles of each group.

Either way the result is ordinary ``(scale, zero)`` per group from
``choose_qparams`` on the shrunk range, so codes stay canonical (integer zeros,
fp16 scales) and run through the same ``QuantLinear``.
"""

from __future__ import annotations

import torch

from llmq.quant.primitives import (
    QuantizedWeight,
    check_finite,
    choose_qparams,
    dequantize,
    effective_group_size,
    num_groups,
    quantize,
    quantize_with_params,
    to_groups,
)

CLIP_MODES = ("mse", "percentile")


def search_clip_qparams(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: int = 40,
    max_shrink: float = 0.6,
    norm: float = 2.4,
    hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` minimising the quantization error over shrink factors.

    Args:
        groups: ``[N, G, g]`` float weights (``to_groups`` layout; zero padding is
            harmless: 0 is always exactly representable).
        grid: number of shrink factors tried, ``f_i = 1 - max_shrink * i / grid``.
        norm: exponent of the weight error (ignored when ``hessian`` is given).
        hessian: optional ``[G, g, g]`` diagonal blocks of ``XᵀX``: the error of a
            group becomes ``dᵀ H_g d`` (its share of the output error).

    Returns:
        scale ``[N, G]`` fp32 (fp16-representable), zero ``[N, G]`` int32.
    """
    groups = groups.float()
    best_scale, best_zero = choose_qparams(groups, bits, symmetric)
    best_err = _group_error(groups, best_scale, best_zero, bits, norm, hessian)
    for i in range(1, grid + 1):
        f = 1.0 - max_shrink * i / grid
        scale, zero = choose_qparams(groups * f, bits, symmetric)
        err = _group_error(groups, scale, zero, bits, norm, hessian)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_error(groups, scale, zero, bits, norm, hessian) -> torch.Tensor:
    """``[N, G]`` error of quantizing ``groups`` ``[N, G, g]`` with the given params."""
    d = dequantize(quantize(groups, scale[..., None], zero[..., None], bits), scale[..., None], zero[..., None]) - groups
    if hessian is None:
        return d.abs().pow(norm).sum(-1)
    # dᵀ H_g d for every (row, group): [N, G, g] x [G, g, g] -> [N, G]
    return torch.einsum("ngk,gkl,ngl->ng", d, hessian, d)


def hessian_diag_blocks(H: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[G, g, g]`` diagonal blocks of ``H`` ``[K, K]`` (zero padded past K), one per group."""
    k = H.shape[0]
    g = effective_group_size(k, group_size)
    G = num_groups(k, group_size)
    pad = G * g - k
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    idx = torch.arange(G, device=H.device)
    return Hp.reshape(G, g, G, g)[idx, :, idx, :]


def percentile_qparams(
    groups: torch.Tensor, bits: int, symmetric: bool, percentile: float = 99.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of the range between the ``100-p`` and ``p`` percentiles of each group."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    groups = groups.float()
    hi = torch.quantile(groups, percentile / 100.0, dim=-1, keepdim=True)
    lo = torch.quantile(groups, 1.0 - percentile / 100.0, dim=-1, keepdim=True)
    return choose_qparams(torch.maximum(torch.minimum(groups, hi), lo), bits, symmetric)


class RTNClip:
    """RTN with a per-group clipping search; calibration free.

    Usage::

        qw = RTNClip(linear.weight, bits=4, group_size=64, symmetric=False).quantize()

    Args:
        weight: ``[N, K]`` (``nn.Linear.weight`` layout), any float dtype.
        clip: ``"mse"`` or ``"percentile"`` (module docstring).
        grid, max_shrink, norm: the MSE search (``search_clip_qparams``).
        percentile: upper percentile kept by ``"percentile"``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        clip: str = "mse",
        grid: int = 40,
        max_shrink: float = 0.6,
        norm: float = 2.4,
        percentile: float = 99.0,
        name: str = "weight",
    ) -> None:
        if clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip!r}: choose one of {CLIP_MODES}")
        if weight.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
        check_finite(weight, name)
        self.W = weight
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.clip, self.grid, self.max_shrink, self.norm, self.percentile = clip, grid, max_shrink, norm, percentile

    def quantize(self) -> QuantizedWeight:
        W = self.W.float()
        groups = to_groups(W, self.group_size)  # [N, G, g]
        if self.clip == "mse":
            scale, zero = search_clip_qparams(groups, self.bits, self.symmetric, self.grid, self.max_shrink, self.norm)
        else:
            scale, zero = percentile_qparams(groups, self.bits, self.symmetric, self.percentile)
        codes = quantize_with_params(W, scale, zero, self.bits, self.group_size)
        return QuantizedWeight(codes, scale, zero, self.bits, self.group_size, self.symmetric)
