"""HQQ-style calibration-free optimisation of scales and zero points (float or integer).

Badri, Shaji, "Half-Quadratic Quantization of Large Machine Learning Models"
(Mobius Labs, 2023; reference code ``hqq/core/optimize.py``,
``optimize_weights_proximal``).

HQQ fits the quantization parameters to the *weights* alone with a robust
``ℓp`` loss (``p < 1``), which lets a few outliers keep a large error instead of
stretching the grid for everyone::

    min_{S, z}  ‖ W − (Q − z) · S ‖_p ,   Q = clamp(round(W / S + z), 0, Qmax)

Half-quadratic splitting adds an auxiliary error ``W_e`` and alternates:

    1. W_e ← shrink_p(W − (Q − z)·S, β)          (generalised soft threshold, p-norm prox)
    2. (S, z) ← argmin ‖(Q − z)·S − (W − W_e)‖²   (closed form, per group)
    3. Q ← clamp(round(W / S + z)),  β ← κ·β

Float zeros (``zero_point="float"``, the recipes' default at 2-4 bits; integer zeros at 8,
see ``llmq.recipes.default_zero_point``) follow the
reference: the scale stays at RTN's (min-max, fp16 as stored), step 2 is the closed
form ``z ← mean_g(Q − (W − W_e) / S)`` for a *float* zero, and the loop stops at
the first iteration that does not lower the mean ``|W − Ŵ|`` of the whole tensor
(keeping the best). Three choices differ from the reference, measured on
SmolLM2-135M (held-out text). Each group keeps the zero with the lowest ``Σ|W − Ŵ|``
of the iterates the tensor-level rule accepted, RTN's included (``keep="group"``;
the reference's ``keep="tensor"`` takes the last accepted iterate for every group, so
some groups end worse than RTN): int3 g64 66.2 vs 67.9, int4 g64 27.48 vs 27.52,
int4 g128 30.55 vs 30.53. The iteration starts from RTN's
*integer* zero (``round(Qmax − max/S)``, so 0.0 is on the grid) instead of the
float ``−min/S`` — asym int4 g64 perplexity 27.52 vs 29.41 (RTN 30.10), and at int3 g64 67.9 vs
207 (RTN 71.3; the reference start collapses there, as the hqq 0.2.8 peer does:
223 in PEERS.md) — and the zero is rounded to fp16 as stored before the final codes
are computed. A short last group's zero-padding is left out of every mean.

Integer zeros (``zero_point="int"``): the reference HQQ updates a
*float* zero with a fixed scale. An integer zero cannot move that way, so step 2 here is a
per-group least-squares line fit ``W − W_e ≈ S·Q + b`` whose zero ``−b/S`` is
rounded to an integer in ``[0, Qmax]`` (projection onto the feasible set), then
the scale is re-fitted for that integer zero. Symmetric recipes keep
``z = 2**(bits-1)`` and fit ``S`` only. Along the way the best ``(S, z)`` per
group is kept — judged by the *L2* weight error (``select_norm=2``), RTN's
parameters included, with the scale rounded to fp16 as it will be stored — so
no group ends with a larger squared error than RTN, and the codes are
recomputed for the exact stored parameters.

An iterate is only accepted for a group if no weight of the group is clamped
by more than half a step (as with RTN). Why: with a free scale the ``ℓp`` fit
(p = 0.7) happily shrinks the range and clamps the few large weights, which
are the ones an LLM needs most (the reference keeps the min-max scale fixed,
which protects them). Measured on SmolLM2-135M int4 g64 before this rule:
perplexity 38.44 selecting by ``ℓp`` and 39.03 selecting by L2, both worse than
RTN's 37.59 (see docs/quality.md).
"""

from __future__ import annotations

import torch

from llmq.quant.primitives import (
    QuantizedWeight,
    check_finite,
    choose_qparams,
    qmax,
    quantize,
    quantize_with_params,
    to_groups,
)

_TINY = torch.finfo(torch.float16).tiny


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / β`` (HQQ's generalised soft thresholding)."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp(min=1e-8).pow(p - 1) / beta)


class HQQ:
    """HQQ-style half-quadratic solver for one Linear weight; needs no calibration data.

    Usage::

        qw = HQQ(linear.weight, bits=3, group_size=64, symmetric=False).quantize()

    Args:
        weight: ``[N, K]`` float (``nn.Linear.weight`` layout); not modified.
        iters: proximal iterations.
        lp_norm: ``p`` of the robust loss (0.7 in the reference).
        beta, kappa: initial penalty and its growth per iteration (10, 1.01).
        select_norm: integer zeros: exponent of the weight error that picks the best iterate per group.
        zero_point: ``"float"`` (the reference's float zero, fixed scale) or ``"int"`` (integer zeros,
            both parameters refitted); ignored when ``symmetric``.
        keep: float zeros: ``"group"`` (each group's best iterate) or ``"tensor"`` (the reference:
            the last iterate the tensor-level stop accepted, for every group).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        iters: int = 20,
        lp_norm: float = 0.7,
        beta: float = 10.0,
        kappa: float = 1.01,
        select_norm: float = 2.0,
        zero_point: str = "float",
        keep: str = "group",
        name: str = "weight",
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
        if not 0 < lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {lp_norm}")
        check_finite(weight, name)
        self.W = weight
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.iters, self.lp_norm, self.beta, self.kappa = iters, lp_norm, beta, kappa
        self.select_norm = select_norm
        if zero_point not in ("int", "float"):
            raise ValueError(f"unknown zero_point {zero_point!r}: choose 'int' or 'float'")
        self.float_zero = zero_point == "float" and not symmetric
        if keep not in ("tensor", "group"):
            raise ValueError(f"unknown keep {keep!r}: choose 'tensor' or 'group'")
        self.keep = keep

    def _objective(self, Wg, S, z) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, G]`` selection error ``Σ|w - ŵ|^select_norm`` and largest ``|w - ŵ|`` of the groups ``Wg``."""
        Q = quantize(Wg, S[..., None], z[..., None], self.bits).float()
        d = (Wg - (Q - z[..., None]) * S[..., None]).abs()
        return d.pow(self.select_norm).sum(-1), d.amax(-1)

    @torch.no_grad()
    def quantize(self) -> QuantizedWeight:
        """The codes and parameters; float32 zeros when ``zero_point="float"``, int32 otherwise."""
        return self._quantize_float_zero() if self.float_zero else self._quantize_int_zero()

    def _quantize_float_zero(self) -> QuantizedWeight:
        W = self.W.detach().float()
        n, k = W.shape
        Wg = to_groups(W, self.group_size)  # [N, G, g]
        g = Wg.shape[-1]
        qm = qmax(self.bits)
        valid = (torch.arange(Wg.shape[1] * g, device=W.device) < k).float().view(1, -1, g)  # [1, G, g]
        count = valid.sum(-1)  # [1, G] real weights per group
        S, z_int = choose_qparams(Wg, self.bits, symmetric=False)  # RTN start: fp16 scales, integer zeros
        S = S[..., None]
        z = best_z = z_int.float()[..., None]
        best_err, beta = float("inf"), self.beta
        best_group = torch.full_like(z, float("inf"))
        for _ in range(self.iters):
            Q = torch.round(Wg / S + z).clamp(0, qm)
            residual = Wg - (Q - z) * S
            err_g = (residual.abs() * valid).sum(-1, keepdim=True)  # [N, G, 1]
            err = float(err_g.sum()) / k / n
            if err >= best_err:
                break
            best_err = err
            if self.keep == "group":
                better = err_g < best_group
                best_group = torch.where(better, err_g, best_group)
                best_z = torch.where(better, z, best_z)
            else:
                best_z = z
            We = shrink_lp(residual, beta, self.lp_norm)
            z = ((Q - (Wg - We) / S) * valid).sum(-1, keepdim=True) / count[..., None]
            beta *= self.kappa
        zeros = best_z[..., 0].to(torch.float16).float()  # as stored
        scales = S[..., 0]
        codes = quantize_with_params(W, scales, zeros, self.bits, self.group_size)
        return QuantizedWeight(codes, scales, zeros, self.bits, self.group_size, self.symmetric)

    def _quantize_int_zero(self) -> QuantizedWeight:
        W = self.W.detach().float()
        Wg = to_groups(W, self.group_size)  # [N, G, g]; padded zeros fit exactly (0 ↦ z)
        qm = qmax(self.bits)
        S, z = choose_qparams(Wg, self.bits, self.symmetric)  # RTN start, [N, G]
        best_S, best_z, (best_err, _) = S, z, self._objective(Wg, S, z)
        zf = z.float()
        beta = self.beta
        for _ in range(self.iters):
            Q = torch.round(Wg / S[..., None] + zf[..., None]).clamp(0, qm)
            We = shrink_lp(Wg - (Q - zf[..., None]) * S[..., None], beta, self.lp_norm)
            T = Wg - We  # target the grid should reproduce
            if not self.symmetric:
                # line fit T ≈ S·Q + b, then project the zero -b/S onto the integers
                qc = Q - Q.mean(-1, keepdim=True)
                var = (qc * qc).sum(-1)
                slope = (qc * T).sum(-1) / var.clamp(min=1e-12)
                b = T.mean(-1) - slope * Q.mean(-1)
                ok = (var > 0) & (slope > 0)
                zf = torch.where(ok, torch.round(-b / slope.clamp(min=_TINY)).clamp(0, qm), zf)
            qz = Q - zf[..., None]
            den = (qz * qz).sum(-1)
            S_new = (qz * T).sum(-1) / den.clamp(min=1e-12)
            S = torch.where((den > 0) & (S_new > 0), S_new, S).clamp(min=_TINY)
            beta *= self.kappa
            # candidate with an fp16-representable scale, as it will be stored
            S16 = S.to(torch.float16).float().clamp(min=_TINY)
            zi = zf.to(torch.int32)
            err, worst = self._objective(Wg, S16, zi)
            # never clamp: every weight stays within half a step, as with RTN (large weights matter most)
            better = (err < best_err) & (worst <= 0.5 * S16 * (1 + 1e-4))
            best_err = torch.where(better, err, best_err)
            best_S = torch.where(better, S16, best_S)
            best_z = torch.where(better, zi, best_z)
        codes = quantize_with_params(W, best_S, best_z, self.bits, self.group_size)
        return QuantizedWeight(codes, best_S, best_z, self.bits, self.group_size, self.symmetric)
