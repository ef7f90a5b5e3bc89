"""Non-linear weight levels: a weight is ``codebook[code] * scale`` instead of ``(code - zero) * scale``.

The source document's non-linear quantization (binary, logarithmic, clustering) plus NF levels.
Storage contract, per Linear ``[N, K]`` (what ``QuantLinear`` stores and every backend reads)::

    codes     [N, K]      uint8 indices into a row of the codebook (packed like uniform codes)
    codebook  [T, 2**b]   fp16-valued, T = 1 (one table shared by all channels: nf, log2, binary)
                          or T = N (one table per output channel: kmeans)
    scales    [N, G]      fp16-valued per-group scales (G groups along K, as uniform recipes)
    w[n, k] = codebook[0 if T == 1 else n, code[n, k]] * scales[n, k // group]   (fp32 math)

Level kinds (``Levels``) and the tables they use (scale-free values in ``[-1, 1]``):

* ``nf`` (2/3/4 bits): normal-float levels built like bitsandbytes' NF4 (QLoRA): quantiles of
  N(0, 1), ``2**(b-1)`` positive, ``2**(b-1) - 1`` negative and an exact 0, divided by the largest;
  scale = the group's absmax (or a shrunk one chosen by a weighted search, ``search_scales``).
* ``log2`` (2/3/4 bits): signed powers of two ``±2**-i``, ``i = 0 .. 2**(b-1) - 1`` (one sign bit, the
  other bits the exponent; no 0: the smallest magnitude stands in for it); scale as ``nf``.
* ``binary`` (1 bit): ``{-1, +1}`` × a per-group scale; the scale minimising the (weighted) squared
  error of ``sign(w) * s`` is the (weighted) mean of ``|w|`` over the group.
* ``kmeans`` (2/3/4 bits): a learned table of ``2**b`` values per output channel (T = N), fitted by
  Lloyd's k-means on the weights divided by their group's absmax, each weight weighted by a
  sensitivity ``h_k · s²`` (``h_k`` = the diagonal Hessian / mean ``x_k²`` of its input feature from
  calibration, the statistic GPTQ's ``diag(H)`` holds; ``None`` = data-free, all weights equal).

Rounding to the nearest level (``nearest_level``) is exact: with an ascending table ``c``, the code
of ``x`` is the number of midpoints ``(c[i] + c[i+1]) / 2`` strictly below ``x``, computed in float64
(exact for fp16-valued tables and fp32 inputs), so a tie between two levels goes to the lower one.
"""

from __future__ import annotations

import torch

from llmq.recipes.weight import LEVEL_BITS, Levels
from llmq.quant.primitives import QuantizedWeight, _round_scale, check_finite, to_groups

KMEANS_ITERS = 30


def codebook_rows(levels: Levels | str, out_features: int) -> int:
    """``T``: rows of the stored codebook (``out_features`` for kmeans, 1 for fixed tables)."""
    return out_features if Levels(levels) is Levels.KMEANS else 1


def level_table(levels: Levels | str, bits: int) -> torch.Tensor:
    """The fixed ascending table ``[2**bits]`` float32 (fp16-valued, max |value| = 1) of nf/log2/binary;
    for kmeans the NF table of that width (its k-means initialisation)."""
    levels = Levels(levels)
    if levels is Levels.UNIFORM or bits not in LEVEL_BITS[levels]:
        raise ValueError(f"no {bits}-bit {levels.value} table: tables exist for "
                         f"{ {k.value: v for k, v in LEVEL_BITS.items()} }")
    if levels is Levels.BINARY:
        return torch.tensor([-1.0, 1.0])
    half = 1 << (bits - 1)
    if levels is Levels.LOG2:
        mags = 2.0 ** -torch.arange(half, dtype=torch.float64)
        return torch.cat([-mags, mags.flip(0)]).sort().values.float()
    # NF: bitsandbytes' create_normal_map, for any width: the outermost quantile sits at `offset`,
    # half-way between the 1/(2·2^b) and 1/(2·(2^b - 1)) tails (0.9677 for 4 bits, as NF4)
    offset = 1 - 0.5 * (1 / (2 * (1 << bits)) + 1 / (2 * ((1 << bits) - 1)))
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    table = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    table = (table / table.abs().max()).sort().values
    return table.to(torch.float16).float()


def nearest_level(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending codebook row, ties to the lower entry.

    Args:
        x: ``[N, M]`` float (at most fp32 precision).
        codebook: ``[T, L]`` ascending rows, T = 1 (one table for every row of ``x``) or T = N.

    Returns:
        ``[N, M]`` int64 codes in ``[0, L)``: the number of midpoints strictly below ``x`` (float64,
        exact for fp16-valued codebooks).
    """
    mids = (codebook[:, 1:].double() + codebook[:, :-1].double()) / 2  # [T, L-1]
    xs = x.double()
    if mids.shape[0] == 1:
        return torch.bucketize(xs, mids[0], right=False)
    if mids.shape[0] != x.shape[0]:
        raise ValueError(f"codebook has {mids.shape[0]} rows; x has {x.shape[0]} (need 1 or {x.shape[0]})")
    return torch.searchsorted(mids.contiguous(), xs.contiguous(), right=False)


def lookup(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[0 or n, codes[n, m]]`` as float32 ``[N, M]`` (codebook ``[T, L]``, T = 1 or N)."""
    cb = codebook.float()
    idx = codes.long()
    if cb.shape[0] == 1:
        return cb[0][idx]
    return torch.gather(cb, 1, idx)


def weighted_error(x: torch.Tensor, codebook: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-row ``Σ_m weight · (x - nearest level)²`` ``[N]`` (x, weight ``[N, M]``)."""
    return (weight * (x - lookup(nearest_level(x, codebook), codebook)) ** 2).sum(1)


def fit_kmeans(x: torch.Tensor, weight: torch.Tensor, init: torch.Tensor, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Weighted Lloyd k-means of each row of ``x``; returns the best fp16-valued codebook seen.

    Args:
        x: ``[N, M]`` float32 values to cluster (one row per output channel).
        weight: ``[N, M]`` non-negative weights (sensitivities); all-equal = plain k-means.
        init: ``[L]`` or ``[N, L]`` ascending starting codebook.

    Returns:
        ``[N, L]`` float32 ascending codebook, fp16-valued, whose weighted error (``weighted_error``)
        is per row never above that of ``init`` rounded to fp16 (each row keeps its best iterate).
    """
    n, _ = x.shape
    cb = init.float().expand(n, -1).half().float().sort(dim=1).values.contiguous()
    best, best_err = cb.clone(), weighted_error(x, cb, weight)
    for _ in range(iters):
        codes = nearest_level(x, cb)
        num = torch.zeros_like(cb).scatter_add_(1, codes, weight * x)
        den = torch.zeros_like(cb).scatter_add_(1, codes, weight)
        # an empty (or weightless) cluster keeps its value
        cb = torch.where(den > 0, num / den.clamp(min=1e-30), cb).half().float().sort(dim=1).values.contiguous()
        err = weighted_error(x, cb, weight)
        better = err < best_err
        best = torch.where(better[:, None], cb, best)
        best_err = torch.where(better, err, best_err)
    return best


def search_scales(groups: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, grid: int = 20,
                  max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group scale ``absmax · (1 - i·max_shrink/grid)``, i < grid, with the least weighted error.

    Args:
        groups: ``[N, G, g]`` float32 weights; table: ``[L]`` ascending, max |value| 1;
        weight: ``[N, G, g]`` (or broadcastable) non-negative error weights.

    Returns ``[N, G]`` float32 fp16-valued scales (i = 0, the absmax, wins ties).
    """
    absmax = groups.abs().amax(-1)
    best_s, best_err = None, None
    for i in range(grid):
        s = _round_scale(absmax * (1 - i * max_shrink / grid), torch.float16)
        x = (groups / s[..., None]).reshape(groups.shape[0], -1)
        q = lookup(nearest_level(x, table[None]), table[None]).reshape(groups.shape) * s[..., None]
        err = (weight * (groups - q) ** 2).sum(-1)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


def level_params(w: torch.Tensor, levels: Levels | str, bits: int, group_size: int | None,
                 sensitivity: torch.Tensor | None = None, search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales ``[N, G]`` and codebook ``[T, 2**bits]`` (both float32, fp16-valued) for ``w`` ``[N, K]``.

    ``sensitivity`` ``[K]`` (non-negative, e.g. ``diag(H)``) weighs each input feature's error;
    ``None`` weighs all equally (data-free). ``search``: nf/log2 pick each group's scale by
    ``search_scales`` instead of taking the absmax.
    """
    levels = Levels(levels)
    n, k = w.shape
    groups = to_groups(w.float(), group_size)  # [N, G, g], zero-padded (padding has weight 0)
    h = torch.ones(k, device=w.device) if sensitivity is None else sensitivity.float().to(w.device).clamp(min=0)
    hg = to_groups(h[None], group_size).expand_as(groups)  # [N, G, g]
    if levels is Levels.BINARY:
        mean_abs = (hg * groups.abs()).sum(-1) / hg.sum(-1).clamp(min=1e-30)
        return _round_scale(mean_abs, torch.float16), level_table(levels, bits)[None].to(w.device)
    table = level_table(levels, bits).to(w.device)
    if levels is Levels.KMEANS:
        scales = _round_scale(groups.abs().amax(-1), torch.float16)
        x = (groups / scales[..., None]).reshape(n, -1)
        weight = (hg * scales[..., None] ** 2).reshape(n, -1)
        return scales, fit_kmeans(x, weight, table)
    scales = search_scales(groups, table, hg) if search else _round_scale(groups.abs().amax(-1), torch.float16)
    return scales, table[None]


def level_codes(w: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Nearest codes ``[N, K]`` uint8 of ``w`` ``[N, K]`` under ``scales`` ``[N, G]`` and ``codebook``."""
    n, k = w.shape
    x = (to_groups(w.float(), group_size) / scales[..., None]).reshape(n, -1)
    return nearest_level(x, codebook)[:, :k].to(torch.uint8).contiguous()


def quantize_weight_levels(w: torch.Tensor, levels: Levels | str, bits: int, group_size: int | None,
                           sensitivity: torch.Tensor | None = None, search: bool = False,
                           name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest-level quantization of a Linear weight ``[N, K]`` (``level_params`` + nearest codes)."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    check_finite(w, name)
    levels = Levels(levels)
    scales, codebook = level_params(w, levels, bits, group_size, sensitivity, search)
    codes = level_codes(w, scales, codebook, group_size)
    return QuantizedWeight(codes, scales, None, bits, group_size, True, codebook=codebook, levels=levels.value)


def refit_codebook(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor,
                   H: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel codebook values that best reproduce ``w`` under the output error, given the codes.

    With ``ŵ_n = A_n c_n`` (``A_n[k, l] = scales[n, k // g]`` where ``codes[n, k] == l``), the values
    minimising ``(w_n − A_n c_n)ᵀ H (w_n − A_n c_n)`` solve ``(A_nᵀ H A_n) c_n = A_nᵀ H w_n`` (a tiny
    ridge toward the old values keeps unused entries where they were). A channel keeps its old
    codebook unless the fp16-rounded new one has a lower objective.

    Args:
        w: ``[N, K]`` float32 target weights; codes: ``[N, K]`` uint8; scales: ``[N, G]``;
        codebook: ``[N, L]`` float32; H: ``[K, K]`` symmetric positive semi-definite (e.g. ``XᵀX``).

    Returns:
        ``(codebook [N, L] ascending fp16-valued float32, codes [N, K] uint8 renumbered to match)``.
    """
    n, k = w.shape
    levels = codebook.shape[1]
    idx = torch.arange(k, device=w.device) // (k if group_size is None else group_size)
    A = torch.nn.functional.one_hot(codes.long(), levels).float() * scales[:, idx, None].float()  # [N, K, L]
    HA = torch.matmul(H.float(), A)  # [N, K, L]
    M = (A.transpose(1, 2) @ HA).double()  # [N, L, L]
    b = (HA.transpose(1, 2) @ w.float()[..., None])[..., 0].double()  # [N, L] (H symmetric)
    old = codebook.double()
    ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)[:, None]  # [N, 1]
    eye = torch.eye(levels, dtype=torch.float64, device=w.device)
    new = torch.linalg.solve(M + ridge[..., None] * eye, (b + ridge * old)[..., None])[..., 0]
    new = new.half().double()

    def objective(c: torch.Tensor) -> torch.Tensor:  # up to the constant wᵀ H w
        return (c[:, None, :] @ M @ c[..., None])[:, 0, 0] - 2 * (c * b).sum(1)

    cb = torch.where((objective(new) < objective(old))[:, None], new, old).float()
    cb, order = cb.sort(dim=1)
    renumber = torch.argsort(order, dim=1)  # old index -> new index
    return cb.contiguous(), torch.gather(renumber, 1, codes.long()).to(torch.uint8)
