"""AWQ: activation-aware per-input-channel scaling, then a clipping search.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration", MLSys 2024
(arXiv:2306.00978), Section 3.2-3.3 (Eq. 4-5) and the ``auto_scale`` /
``auto_clip`` search of the reference code.

A few input channels carry large activations; their weights matter most.
Multiplying input channel ``k`` of every Linear that reads ``X`` by ``s_k`` and
dividing ``X`` by ``s_k`` leaves the float output unchanged but gives those
weights a finer relative grid. The division is *folded* into whatever produced
``X`` (the RMSNorm weight before q/k/v or gate/up, the rows of ``up_proj`` before
``down_proj``) by the caller, so nothing is added at inference::

    X [T, K] ──▶ Linear_i (W_i [N_i, K])          becomes
    (X / s)  ──▶ Linear_i (Q(W_i · s))           with 1/s folded into the producer of X

Scale search (Eq. 5): ``s = s_X^α`` with ``s_X`` the mean |x| per channel,
normalised by ``sqrt(max·min)``, for ``α`` on a grid in ``[0, 1)``. Each
candidate gives the Linears the weights ``Q(W_i · s) / s``; it is scored either

- by the output of the block that contains the Linears (the whole attention for
  q/k/v, the whole MLP for gate/up), as the reference code's ``module2inspect``
  does: ``search_scales(output_loss)`` with ``llmq.pipeline.block_loss``; or
- by the Linears' own output error, from the accumulated ``H`` ``[K, K]``
  (every calibration token counts at the cost of one ``[N, K] × [K, K]``
  product per grid point; exact where the block *is* the Linear, o_proj and
  down_proj)::

    L(α) = Σ_i ‖(Q(W_i · s) / s − W_i) Xᵀ‖² = Σ_i Σ_n d_n H d_nᵀ,   H = XᵀX / T

``α = 0`` is ``s = 1``, i.e. plain RTN, so the chosen scale never has a larger
loss than RTN.

Clip search: per group the range is shrunk by ``f`` on a grid and the ``f``
with the least output error ``dᵀ H_g d`` (``H_g``: diagonal ``g × g`` block of
``H``, in the scaled input space) is kept — ``llmq.algorithms.rtn_clip``.
"""

from __future__ import annotations

from typing import Callable

import torch

from llmq.algorithms.rtn_clip import hessian_diag_blocks, search_clip_qparams
from llmq.quant.primitives import (
    QuantizedWeight,
    check_finite,
    choose_qparams,
    quantize_with_params,
    dequantize_groups,
    to_groups,
)


class AWQ:
    """AWQ for a set of Linears that read the same input.

    Usage::

        awq = AWQ([q.weight, k.weight, v.weight], bits=4, group_size=128, symmetric=False)
        for x in inputs_of_q:            # [..., K]
            awq.add_batch(x)
        s = awq.search_scales()          # [K]; caller divides the producer of X by s
        qws = awq.quantize(s)            # list[QuantizedWeight] of W_i · s

    Args:
        weights: list of ``[N_i, K]`` float weights; not modified.
        n_grid: number of ``α`` values ``0, 1/n_grid, …``.
        clip: run the clipping search after scaling.
        clip_grid, max_shrink: the clip grid (``f = 1 - max_shrink · i / clip_grid``).
        names: module names for error messages.
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        bits: int,
        group_size: int | None,
        symmetric: bool,
        n_grid: int = 20,
        clip: bool = True,
        clip_grid: int = 20,
        max_shrink: float = 0.5,
        names: list[str] | None = None,
    ) -> None:
        names = names or [f"weight{i}" for i in range(len(weights))]
        if not weights:
            raise ValueError("AWQ needs at least one weight")
        k = weights[0].shape[1]
        for w, name in zip(weights, names):
            if w.dim() != 2 or w.shape[1] != k:
                raise ValueError(f"{name}: AWQ weights must all be [N_i, {k}], got {tuple(w.shape)}")
            check_finite(w, name)
        self.weights, self.names = weights, names
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.n_grid, self.clip, self.clip_grid, self.max_shrink = n_grid, clip, clip_grid, max_shrink
        device = weights[0].device
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)  # XᵀX / T
        self.x_abs_sum = torch.zeros(k, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate ``XᵀX / T`` and ``Σ|x|`` over the rows of ``inp`` ``[..., K]``."""
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        t = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + t)
        self.H.addmm_(x.T, x, alpha=1.0 / (self.nsamples + t))
        self.x_abs_sum += x.abs().sum(0)
        self.nsamples += t

    def _rtn(self, w: torch.Tensor) -> torch.Tensor:
        """Dequantized plain-RTN ``w`` ``[N, K]`` (the quantizer inside the scale search)."""
        groups = to_groups(w, self.group_size)
        scale, zero = choose_qparams(groups, self.bits, self.symmetric)
        codes = quantize_with_params(w, scale, zero, self.bits, self.group_size)
        return dequantize_groups(codes, scale, zero, self.group_size)

    def candidates(self, s: torch.Tensor) -> list[torch.Tensor]:
        """``Q(W_i · s) / s`` ``[N_i, K]`` fp32 for every weight: what the Linears compute with scale ``s``."""
        return [self._rtn(w.float() * s) / s for w in self.weights]

    def _loss(self, s: torch.Tensor) -> float:
        loss = 0.0
        for w, w_hat in zip(self.weights, self.candidates(s)):
            d = w_hat - w.float()  # [N, K]
            loss += ((d @ self.H) * d).sum().item()
        return loss

    @torch.no_grad()
    def search_scales(self, output_loss: Callable[[list[torch.Tensor]], float] | None = None,
                      tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Per-input-channel scales ``s`` ``[K]`` fp32 minimising ``L(α)`` (Eq. 5).

        Args:
            output_loss: scores the candidate weights ``[Q(W_i·s)/s]`` by the output of the
                block that contains the Linears (``llmq.pipeline.block_loss``, the reference
                code's ``module2inspect``); ``None`` scores the Linears' own outputs through ``H``.
            tie: maps the mean ``|x|`` ``[K]`` to one whose channels are equal where the scales must be
                (``v → o`` under grouped-query attention: the query heads of one KV head,
                ``llmq.arch.folding.tie_heads``); ``s`` is elementwise in it, so it is tied alike.
        """
        if self.nsamples == 0:
            raise ValueError(f"{self.names[0]}: AWQ needs calibration inputs; call add_batch() first")
        score = self._loss if output_loss is None else (lambda s: output_loss(self.candidates(s)))
        x_mean = self.x_abs_sum / self.nsamples
        if tie is not None:
            x_mean = tie(x_mean)
        best_s = torch.ones_like(x_mean)
        best_loss = score(best_s)  # α = 0: plain RTN
        for i in range(1, self.n_grid):
            alpha = i / self.n_grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            loss = score(s)
            if loss < best_loss:
                best_loss, best_s = loss, s
        self.best_loss = best_loss
        return best_s

    @torch.no_grad()
    def quantize(self, scales: torch.Tensor | None = None) -> list[QuantizedWeight]:
        """Quantize ``W_i · scales`` (clip search on the scaled inputs ``X / scales``).

        Args:
            scales: ``[K]`` from ``search_scales`` (``None`` = no scaling).

        Returns:
            one ``QuantizedWeight`` per weight, of ``W_i · scales``: the caller must
            divide the producer of ``X`` by the same ``scales``.
        """
        k = self.H.shape[0]
        s = torch.ones(k, device=self.H.device) if scales is None else scales.float()
        H = self.H / s[:, None] / s[None, :]  # Hessian of the scaled inputs X / s
        hblocks = hessian_diag_blocks(H, self.group_size) if self.clip else None
        out = []
        for w in self.weights:
            ws = w.float() * s
            groups = to_groups(ws, self.group_size)
            if self.clip:
                scale, zero = search_clip_qparams(
                    groups, self.bits, self.symmetric, self.clip_grid, self.max_shrink, hessian=hblocks
                )
            else:
                scale, zero = choose_qparams(groups, self.bits, self.symmetric)
            codes = quantize_with_params(ws, scale, zero, self.bits, self.group_size)
            out.append(QuantizedWeight(codes, scale, zero, self.bits, self.group_size, self.symmetric))
        return out
