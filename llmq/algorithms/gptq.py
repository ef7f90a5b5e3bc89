"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323),
Algorithm 1, with the IST-DASLab reference ``gptq.py`` as the model.

The layer-wise problem: given calibration inputs ``X`` ``[T, K]`` of a Linear with
weight ``W`` ``[N, K]``, find codes ``Ŵ`` minimising ``‖W Xᵀ − Ŵ Xᵀ‖²``. Its
Hessian is ``H = 2 XᵀX / T`` ``[K, K]``. GPTQ quantizes the columns of ``W`` one
at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian (OBS update). Three tricks make it
fast and stable:

* dampening: ``H += percdamp · mean(diag H) · I`` before inverting;
* Cholesky: the needed rows of ``H⁻¹`` are the rows of ``chol(H⁻¹)ᵀ`` (upper);
* lazy batch updates: errors of a block of ``blocksize`` columns are applied to
  the rest of ``W`` in one matmul after the block (``Err1 @ Hinv[i1:i2, i2:]``).

Blocks vs groups (K = 576, blocksize = 128, group_size = 64)::

    columns  0        128       256       384       512  576
    blocks   |--B0----|--B1----|--B2----|--B3----|-B4-|        lazy updates, per block
    groups   |g0|g1---|g2|g3---|g4|g5---|g6|g7---|g8-|         one (scale, zero) each

Act-order (``act_order=True``, the "desc_act" of later implementations) visits
columns by decreasing ``diag(H)`` — the most important first — which helps at
low bits. With *dynamic* groups that would tie a group's parameters to a
permuted column set and need a ``g_idx`` at inference. Here groups are *static*:
every group's ``(scale, zero)`` is chosen from the original ``W`` before the
loop, in canonical column order, and column ``k`` always uses group ``k // g``.
The permutation is undone on the codes at the end, so the output is the
canonical ``QuantizedWeight`` that ``QuantLinear`` and every kernel run as is.
Without act-order, groups are dynamic as in the paper (chosen from the
error-updated weights when the loop reaches a group's first column).

Non-uniform levels (``levels`` != "uniform", ``llmq.quant.levels``): each column rounds to the
nearest codebook entry times its group's scale, and its error is fed back exactly as above. Groups
are then always static; the scales (and, for kmeans, the per-channel codebooks: k-means weighted by
``diag(H)``, the sensitivity of each input feature) are fitted from the original ``W`` before the
loop. With ``refit=True`` kmeans codebooks are refitted after the loop: given GPTQ's assignments, the
values minimising ``Σ_n (w_n − ŵ_n)ᵀ H (w_n − ŵ_n)`` solve an ``L × L`` least-squares system per
channel (``llmq.quant.levels.refit_codebook``). ``error_feedback=False`` rounds every column to the
nearest level (or grid point) of the same static parameters with no OBS update: the data-aware
baseline GPTQ's feedback is measured against.

Group parameters come from ``choose_qparams`` or, with ``clip_search=True``,
from the MSE clip search of ``llmq.algorithms.rtn_clip`` (the reference
``Quantizer(mse=True)``), with the error weighted by the diagonal Hessian
block of each group (``dᵀ H_g d``) rather than plain weight MSE: a weight-space
clip can clip exactly the weights whose inputs are large.
"""

from __future__ import annotations

import math

import torch

from llmq.algorithms.rtn_clip import hessian_diag_blocks, search_clip_qparams
from llmq.quant.levels import level_codes, level_params, lookup, nearest_level, refit_codebook
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


class GPTQ:
    """GPTQ for one Linear weight.

    Usage::

        gptq = GPTQ(linear.weight, bits=4, group_size=128, symmetric=False)
        for x in calibration_inputs:         # [..., K] inputs of this Linear
            gptq.add_batch(x)
        qw = gptq.quantize()                 # QuantizedWeight, canonical order

    Linears fed by the same input (q/k/v, gate/up) may share one Hessian:
    ``other.H, other.nsamples = gptq.H, gptq.nsamples``.

    Args:
        weight: ``[N, K]`` float (``nn.Linear.weight`` layout); not modified.
        bits, group_size (``None`` = per channel), symmetric: the recipe.
        blocksize: columns per lazy-update block (``B`` in the paper).
        percdamp: dampening as a fraction of ``mean(diag H)``.
        act_order: quantize columns by decreasing ``diag(H)`` (static groups).
        clip_search: choose group parameters by the MSE clip search (nf/log2 levels: the
            ``diag(H)``-weighted scale search of ``llmq.quant.levels.search_scales``).
        levels: ``"uniform"`` or a non-uniform kind (``llmq.recipes.Levels`` value, symmetric).
        error_feedback: the OBS update (``False``: nearest rounding with the same static parameters).
        refit: kmeans only: least-squares codebook refit after the loop.
        name: module name for error messages.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = True,
        clip_search: bool = True,
        name: str = "weight",
        levels: str = "uniform",
        error_feedback: bool = True,
        refit: bool = True,
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
        if not 0 < percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {percdamp}")
        check_finite(weight, name)
        self.W = weight
        self.name = name
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.blocksize, self.percdamp, self.act_order, self.clip_search = blocksize, percdamp, act_order, clip_search
        self.levels, self.error_feedback, self.refit = str(getattr(levels, "value", levels)), error_feedback, refit
        self.columns = weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate ``H = 2/T · Σ xᵀx`` over the rows (tokens) of ``inp`` ``[..., K]``."""
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        t = x.shape[0]
        # running mean, so H stays O(1) whatever the number of tokens
        self.H *= self.nsamples / (self.nsamples + t)
        self.nsamples += t
        x = math.sqrt(2 / self.nsamples) * x
        self.H.addmm_(x.T, x)

    def _qparams(self, w: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` ``[N, G]`` for ``w`` ``[N, k]`` split into groups of ``self.group_size``.

        ``H`` ``[k, k]`` is the Hessian of these columns: the clip search weighs a
        group's error by it (``dᵀ H_g d``), so clipping never sacrifices weights on
        inputs that matter.
        """
        group_size = self.group_size if w.shape[1] > (self.group_size or 0) else None
        groups = to_groups(w, group_size)
        if self.clip_search:
            blocks = hessian_diag_blocks(H, group_size)
            return search_clip_qparams(groups, self.bits, self.symmetric, hessian=blocks)
        return choose_qparams(groups, self.bits, self.symmetric)

    @torch.no_grad()
    def quantize(self) -> QuantizedWeight:
        """Algorithm 1 of the paper; returns codes in canonical (unpermuted) column order."""
        if self.nsamples == 0:
            raise ValueError(f"{self.name}: GPTQ needs calibration inputs; call add_batch() before quantize()")
        W = self.W.detach().to(self.H.device, torch.float32).clone()  # [N, K]
        N, K = W.shape
        H = self.H.clone()
        g = effective_group_size(K, self.group_size)
        G = num_groups(K, self.group_size)

        dead = torch.diag(H) == 0  # inputs that are always zero: weight irrelevant
        H[dead, dead] = 1
        W[:, dead] = 0

        static = self.act_order or self.levels != "uniform" or not self.error_feedback
        scales = torch.empty(N, G, dtype=torch.float32, device=W.device)
        zeros = torch.empty(N, G, dtype=torch.int32, device=W.device)
        codebook = None
        if self.levels != "uniform":
            scales, codebook = level_params(W, self.levels, self.bits, self.group_size, torch.diag(H), self.clip_search)
            zeros = None
        elif static:
            scales, zeros = self._qparams(W, H)
        if not self.error_feedback:
            Q = (quantize_with_params(W, scales, zeros, self.bits, self.group_size) if codebook is None
                 else level_codes(W, scales, codebook, self.group_size))
            return self._result(Q, scales, zeros, codebook, W, H)
        W0, H0 = W.clone(), H.clone()  # canonical order, for the codebook refit
        perm = torch.arange(K, device=W.device)
        if self.act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        group_of = perm // g  # canonical group of the column at each (permuted) position

        Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
        Hinv = self._inverse_cholesky(H)  # upper Cholesky factor of H⁻¹

        for i1 in range(0, K, self.blocksize):
            i2 = min(i1 + self.blocksize, K)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros(N, count, dtype=torch.uint8, device=W.device)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                col = i1 + i
                if not static and col % g == 0:
                    # dynamic group: parameters from the error-updated columns col..col+g
                    upcoming = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                    s, z = self._qparams(upcoming, H[col : col + g, col : col + g])
                    scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                gi = group_of[col]
                s = scales[:, gi]
                if codebook is None:
                    z = zeros[:, gi]
                    q = quantize(w, s, z, self.bits)
                    deq = dequantize(q, s, z)
                else:  # nearest codebook entry of w / s, per output channel
                    q = nearest_level((w / s)[:, None], codebook)
                    deq = lookup(q, codebook)[:, 0] * s
                    q = q[:, 0].to(torch.uint8)
                Q1[:, i] = q
                err1 = (w - deq) / d
                W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if self.act_order:
            Q = Q[:, torch.argsort(perm)]
        return self._result(Q, scales, zeros, codebook, W0, H0)

    def _result(self, Q, scales, zeros, codebook, W, H) -> QuantizedWeight:
        """The ``QuantizedWeight``; kmeans codebooks refitted to ``W``, ``H`` (canonical order) if asked."""
        if codebook is None:
            return QuantizedWeight(Q.contiguous(), scales, zeros, self.bits, self.group_size, self.symmetric)
        if self.refit and codebook.shape[0] > 1:
            codebook, Q = refit_codebook(W, Q, scales, codebook, H, self.group_size)
        return QuantizedWeight(Q.contiguous(), scales, None, self.bits, self.group_size, True,
                               codebook=codebook, levels=self.levels)

    def _inverse_cholesky(self, H: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of ``(H + λI)⁻¹``; raises λ tenfold while H is not positive definite."""
        damp = self.percdamp * torch.mean(torch.diag(H))
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for _ in range(5):
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if info == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info == 0:
                    return U
            damp = damp * 10
        raise ValueError(
            f"{self.name}: the calibration Hessian is not positive definite even with heavy dampening; "
            f"use more calibration samples (--nsamples) or a larger percdamp"
        )
