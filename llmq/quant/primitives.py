"""Quantization primitives: THE pure-torch reference every algorithm and kernel is checked against.

Linear (affine) quantization as in the seed document::

    Q = clamp(round(R / S + Z), 0, Qmax)        # quantize
    R' = (Q - Z) * S                             # dequantize

Codes ``Q`` are always *unsigned* integers in ``[0, Qmax]`` with ``Qmax = 2**bits - 1``.

* Asymmetric: the group's range is first widened to contain 0 (so 0.0 is exactly
  representable and the integer zero point lies in ``[0, Qmax]``), then
  ``S = (Rmax - Rmin) / Qmax`` and ``Z = round(Qmax - Rmax / S)``.
* Symmetric: ``Z = 2**(bits-1)`` (fixed, never stored) and
  ``S = max|R| / (Qmax / 2)``, i.e. the signed range ``[-2**(b-1), 2**(b-1)-1]``
  uses all ``2**b`` levels (the GPTQ / compressed-tensors convention; at +max|R|
  the code saturates at Qmax with an error of exactly S/2).

Either way every element inside the group's range is reproduced within ``S/2``.

Groups run along the *input* dimension K of a weight ``[N, K]``. When K is not a
multiple of the group size the weight is zero-padded on the right up to a whole
number of groups; the zeros never widen a range (0 is always inside it) and the
padded codes are sliced away, so the last group is simply shorter.

Degenerate groups: an all-zero group would give ``S = 0``; its scale is set to 1
(codes equal Z, dequantizing to exactly 0). Scales are rounded to their storage
dtype (fp16 by default, rounding up so the range stays covered) *before* codes
are computed, so the stored scale is the one the codes were made for; they are
clamped to fp16's smallest normal number.
Rounding is round-half-to-even (``torch.round``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
_MIN_SCALE = torch.finfo(torch.float16).tiny  # smallest normal fp16; keeps scales representable


def qmax(bits: int) -> int:
    """Largest unsigned code of a ``bits``-wide integer."""
    return (1 << bits) - 1


def symmetric_zero(bits: int) -> int:
    """The fixed zero point of symmetric quantization (``2**(bits-1)``)."""
    return 1 << (bits - 1)


def choose_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``x``, reducing over the last dimension.

    Args:
        x: ``[..., G]`` float; each slice along the last dim is one group.
        bits: code width.
        symmetric: see module docstring.
        scale_dtype: dtype the scale is stored in (its rounding is applied here).

    Returns:
        scale ``[...]`` float32 (values exactly representable in ``scale_dtype``),
        zero ``[...]`` int32 in ``[0, Qmax]``.
    """
    x = x.float()
    q = qmax(bits)
    if symmetric:
        absmax = x.abs().amax(dim=-1)
        scale = absmax / (q / 2)
        scale = _round_scale(scale, scale_dtype)
        zero = torch.full_like(scale, symmetric_zero(bits), dtype=torch.int32)
        return scale, zero
    rmin = x.amin(dim=-1).clamp(max=0)
    rmax = x.amax(dim=-1).clamp(min=0)
    scale = _round_scale((rmax - rmin) / q, scale_dtype)
    zero = torch.round(q - rmax / scale).clamp(0, q).to(torch.int32)
    return scale, zero


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    # all-zero group -> S = 0; any positive scale reproduces it exactly (codes == Z)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=_MIN_SCALE)
    # Round *up* to the storage dtype: a scale rounded down would no longer cover the
    # group's range and the saturated extreme would miss the S/2 error bound.
    stored = scale.to(scale_dtype)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < scale, up, stored).float()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / scale + zero), 0, Qmax)`` as uint8 codes.

    ``scale`` and ``zero`` broadcast against ``x`` (give them a trailing size-1 dim
    for per-group use).
    """
    q = torch.round(x.float() / scale + zero)
    return q.clamp(0, qmax(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in float32 (broadcasting as in ``quantize``)."""
    return (codes.float() - zero) * scale


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group parameters of one ``[N, K]`` weight.

    The interchange format between algorithms (which produce it) and
    ``QuantLinear`` (which packs it). Orientation follows ``nn.Linear.weight``.

    Attributes:
        codes: ``[N, K]`` uint8, values in ``[0, 2**bits - 1]``.
        scales: ``[N, n_groups]`` float32 (exactly representable in fp16).
        zeros: ``[N, n_groups]`` int32 integer zero points (for symmetric recipes all
            ``2**(bits-1)``), or float32 float zero points (``zero_point="float"``, HQQ-style:
            ``W = (code - zero) * scale`` with a zero off the integer grid; values fp16-representable,
            as stored); ``None`` with non-uniform levels.
        bits, group_size (``None`` = per channel), symmetric: the recipe used.
        codebook: non-uniform levels only (``llmq.quant.levels``): ``[T, 2**bits]`` float32
            fp16-valued, T = 1 or N; then ``W[n, k] = codebook[0 or n, code] * scale`` (symmetric).
        levels: the level kind (``llmq.quant.levels.Levels`` value), ``"uniform"`` for the integer grid.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int | None
    symmetric: bool
    codebook: torch.Tensor | None = None
    levels: str = "uniform"

    @property
    def float_zeros(self) -> bool:
        """True when the zero points are floats (HQQ-style), not integer codes."""
        return self.zeros is not None and self.zeros.is_floating_point()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight these codes stand for."""
        if self.codebook is not None:
            from llmq.quant.levels import lookup  # (levels builds on this module)

            n, k = self.codes.shape
            idx = torch.arange(k, device=self.codes.device) // effective_group_size(k, self.group_size)
            return lookup(self.codes, self.codebook) * self.scales[:, idx].float()
        return dequantize_groups(self.codes, self.scales, self.zeros, self.group_size)


def effective_group_size(k: int, group_size: int | None) -> int:
    """Group length along K; per-channel (``None``) means one group of length K."""
    return k if group_size is None else group_size


def num_groups(k: int, group_size: int | None) -> int:
    g = effective_group_size(k, group_size)
    return -(-k // g)


def to_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``[N, K]`` as ``[N, n_groups, g]``, zero-padding K up to ``n_groups * g``."""
    n, k = w.shape
    g = effective_group_size(k, group_size)
    pad = num_groups(k, group_size) * g - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, g)


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``w`` holds NaN or Inf."""
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"{name}: weight has {bad} NaN/Inf value(s); quantization needs finite weights — "
            f"check the source checkpoint or exclude this module (--exclude '{name}')"
        )


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    name: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of a Linear weight.

    Args:
        w: ``[N, K]`` float weight (``nn.Linear.weight`` layout).
        name: module name for error messages.
    """
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    check_finite(w, name)
    n, k = w.shape
    groups = to_groups(w.float(), group_size)  # [N, G, g]
    scale, zero = choose_qparams(groups, bits, symmetric)  # [N, G]
    codes = quantize(groups, scale[..., None], zero[..., None], bits).reshape(n, -1)[:, :k]
    return QuantizedWeight(codes.contiguous(), scale, zero, bits, group_size, symmetric)


def quantize_with_params(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Codes ``[N, K]`` uint8 of ``w`` under given per-group ``scales``/``zeros`` ``[N, n_groups]``."""
    n, k = w.shape
    groups = to_groups(w.float(), group_size)
    return quantize(groups, scales[..., None], zeros[..., None], bits).reshape(n, -1)[:, :k].contiguous()


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Float32 ``[N, K]`` from codes ``[N, K]`` and per-group ``scales``/``zeros`` ``[N, n_groups]``."""
    n, k = codes.shape
    g = effective_group_size(k, group_size)
    idx = torch.arange(k, device=codes.device) // g  # group of each input column
    return (codes.float() - zeros[:, idx].float()) * scales[:, idx].float()
