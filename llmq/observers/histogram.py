"""Saturated observers built on a histogram of ``|x|``: percentile, MSE search, KL-entropy (TensorRT).

All three share ``HistogramObserver``: ``bins`` (default 2048, as in TensorRT)
equal-width bins of ``|x|`` over ``[0, R)`` per channel (one channel per tensor),
accumulated over calibration batches.

Range growth: ``R`` starts at the first batch's ``max|x|``. When a later batch
exceeds it, ``R`` is multiplied by the smallest power of two ``2**k`` that covers
the new maximum and the old counts are merged ``2**k`` bins into one: bin ``j``
moves to ``j >> k``. Bin edges of the old histogram are edges of the new one, so
the merge is exact (no count is redistributed by guesswork) at the price of up
to half the bins lying above the data (resolution ``>= R / 2 / bins``). All-zero
batches only count into bin 0, which holds 0 for every ``R``.

Thresholds are bin edges clamped to the largest ``|x|`` seen, so a saturated
observer never returns a threshold above the unsaturated one.
"""

from __future__ import annotations

import torch

from llmq.observers.base import Observer


class HistogramObserver(Observer):
    """Accumulates a ``[C, bins]`` histogram of ``|x|``; subclasses pick the threshold."""

    saturated = True

    def __init__(self, bins: int = 2048, bits: int = 8, per_channel: bool = False, axis: int = -1) -> None:
        super().__init__(bits, per_channel, axis)
        levels = 1 << (bits - 1)
        if bins < levels:
            raise ValueError(f"histogram needs at least {levels} bins for {bits}-bit thresholds, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # [C, bins] float64 counts
        self.range: torch.Tensor | None = None  # [C] float32, upper edge R (0 = only zeros seen)
        self.absmax: torch.Tensor | None = None  # [C] largest |x| seen

    def _observe(self, x2d: torch.Tensor) -> None:
        a = x2d.abs()  # [rows, C]
        c = a.shape[1]
        bmax = a.amax(dim=0)
        if self.hist is None:
            self.hist = torch.zeros(c, self.bins, dtype=torch.float64, device=a.device)
            self.range = torch.zeros(c, dtype=torch.float32, device=a.device)
            self.absmax = torch.zeros(c, dtype=torch.float32, device=a.device)
        self._grow(bmax)
        self.absmax = torch.maximum(self.absmax, bmax)
        r = torch.where(self.range > 0, self.range, torch.ones_like(self.range))
        idx = (a / r * self.bins).floor().clamp(max=self.bins - 1).long()  # [rows, C]; |x| = R -> last bin
        flat = (idx + torch.arange(c, device=a.device) * self.bins).reshape(-1)
        self.hist += torch.bincount(flat, minlength=c * self.bins).reshape(c, self.bins).double()

    def _grow(self, bmax: torch.Tensor) -> None:
        need = bmax > self.range
        if not bool(need.any()):
            return
        fresh = need & (self.range == 0)  # only zeros so far: counts sit in bin 0, valid for any R
        grow = need & (self.range > 0)
        if bool(grow.any()):
            ratio = torch.where(grow, bmax / torch.where(grow, self.range, torch.ones_like(self.range)),
                                torch.ones_like(bmax))
            k = torch.ceil(torch.log2(ratio)).clamp(min=0).long()
            k = torch.where(grow & (self.range * 2.0 ** k < bmax), k + 1, k)  # log2 rounding guard
            k = torch.where(grow, k.clamp(min=1), torch.zeros_like(k)).clamp(max=62)
            src = torch.arange(self.bins, device=bmax.device)[None, :] >> k[:, None]  # [C, bins]
            self.hist = torch.zeros_like(self.hist).scatter_add_(1, src, self.hist)
            self.range = torch.where(grow, self.range * 2.0 ** k.float(), self.range)
        self.range = torch.where(fresh, bmax, self.range)

    @property
    def bin_width(self) -> torch.Tensor:
        return self.range / self.bins  # [C]

    def _threshold(self) -> torch.Tensor:
        out = torch.empty_like(self.range)
        for ch in range(self.hist.shape[0]):
            if self.absmax[ch] == 0:
                out[ch] = 0.0
                continue
            edge = self._threshold_bins(self.hist[ch])  # threshold in units of bins (an edge index)
            out[ch] = min(edge * float(self.bin_width[ch]), float(self.absmax[ch]))
        return out

    def _threshold_bins(self, hist: torch.Tensor) -> int:
        """Threshold as a bin-edge index ``i`` (``T = i * R / bins``) for one channel's histogram."""
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    """``T`` = the ``percentile``-th percentile of ``|x|`` (seed: 直方图截断法), at bin resolution.

    Returns the upper edge of the bin where the cumulative count first reaches
    ``percentile / 100`` of all values, so at least that fraction is never clipped.
    """

    def __init__(self, percentile: float = 99.9999, bins: int = 2048, bits: int = 8, per_channel: bool = False,
                 axis: int = -1) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(bins, bits, per_channel, axis)
        self.percentile = percentile

    def _threshold_bins(self, hist: torch.Tensor) -> int:
        cum = hist.cumsum(0)
        target = cum[-1] * (self.percentile / 100.0)
        j = int(torch.searchsorted(cum, target.reshape(1)).item())
        return min(j, self.bins - 1) + 1


class MSEObserver(HistogramObserver):
    """``T`` minimising the expected squared quantization error over the histogram.

    For each candidate edge ``t`` (every bin edge), with step ``s = t / 127.5``::

        cost(t) = sum_j n_j * ((c_j - t)^2      if c_j > t     # clipping error
                               s^2 / 12         otherwise)      # rounding noise

    where ``c_j`` are bin centres and ``n_j`` counts — the classical uniform-noise
    model, which stays meaningful when a step is narrower than a bin.
    """

    def _threshold_bins(self, hist: torch.Tensor) -> int:
        n = self.bins
        centres = torch.arange(n, dtype=torch.float64, device=hist.device) + 0.5  # in bin units
        cand = torch.arange(1, n + 1, dtype=torch.float64, device=hist.device)  # edges, bin units
        step = cand / ((1 << self.bits) / 2 - 0.5)  # t / 127.5
        clipped = centres[None, :] > cand[:, None]  # [cands, bins]
        err = torch.where(clipped, (centres[None, :] - cand[:, None]) ** 2, step[:, None] ** 2 / 12)
        cost = (err * hist[None, :]).sum(dim=1)
        return int(cand[int(torch.argmin(cost))].item())


class KLObserver(HistogramObserver):
    """TensorRT's entropy calibration (seed: KL散度校准法; Migacz, GTC 2017).

    For every candidate edge ``i`` in ``[128, bins]`` (``128 = 2**(bits-1)``
    magnitude levels of int8):

    1. ``P`` = the first ``i`` bins, with all counts beyond ``i`` added to bin
       ``i - 1`` (what saturation does to the outliers);
    2. ``Q`` = the first ``i`` bins merged into 128 levels (``i // 128`` bins each,
       the remainder into the last level) and expanded back, each level's count
       spread evenly over the bins where ``P`` is non-empty (empty bins stay empty);
    3. both smoothed as the published implementations do (MXNet, onnxruntime, TVM):
       every zero bin gets ``eps = 1e-4`` counts, taken evenly off the non-zero bins,
       so a level that ``Q`` leaves empty costs a large but finite divergence;
    4. ``KL(P || Q)`` on the normalised distributions.

    ``T`` is the first edge with the smallest divergence. All candidates are evaluated
    at once (``[bins - 127, bins]`` float64 tensors, ~30 MB for 2048 bins); per
    channel runs one search per channel. ``tests/observers/test_kl_tensorrt.py``
    checks every step against a loop-by-loop transcription of the published algorithm.

    Why it does badly on LLM activations (``docs/ptq_onnx.md``): at ``i = 128`` each level
    is one bin, so ``Q`` equals ``P`` except for the folded outliers, and the divergence
    only sees the *probability mass* clipped — a few massive activations in millions of
    values are almost free to clip, while every larger ``i`` merges the crowded first bins.
    """

    EPS = 1e-4  # smoothing counts per zero bin (MXNet / onnxruntime / TVM)

    def _divergences(self, hist: torch.Tensor) -> torch.Tensor:
        """``KL(P_i || Q_i)`` ``[bins - nq + 1]`` float64 for ``i = nq .. bins`` (``inf`` where undefined)."""
        n, nq = self.bins, 1 << (self.bits - 1)
        dev = hist.device
        hist = hist.double()
        cand = torch.arange(nq, n + 1, device=dev)  # i: number of bins kept
        rows = torch.arange(len(cand), device=dev)
        j = torch.arange(n, device=dev)
        inside = j[None, :] < cand[:, None]  # [cands, bins]
        zero = torch.zeros((), dtype=hist.dtype, device=dev)
        kept = torch.where(inside, hist[None, :], zero)
        cum = hist.cumsum(0)
        tail = cum[-1] - cum[cand - 1]  # counts beyond edge i
        p = kept.clone()
        p[rows, cand - 1] += tail
        nonzero = p != 0
        merged = (cand // nq)[:, None]
        level = torch.minimum(j[None, :] // merged, torch.full_like(merged, nq - 1))  # [cands, bins]
        level = torch.where(inside, level, torch.zeros_like(level))
        qsum = torch.zeros(len(cand), nq, dtype=hist.dtype, device=dev).scatter_add_(1, level, kept)
        qcnt = torch.zeros_like(qsum).scatter_add_(1, level, nonzero.double())
        q = torch.where(nonzero, (qsum / qcnt.clamp(min=1)).gather(1, level), torch.zeros_like(p))
        p, p_ok = self._smooth(p, inside)
        q, q_ok = self._smooth(q, inside)
        p = p / p.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=1, keepdim=True)
        terms = torch.where(inside & (p > 0), p * (p.log() - q.clamp(min=1e-300).log()), torch.zeros_like(p))
        kl = terms.sum(dim=1)
        return torch.where(p_ok & q_ok, kl, torch.full_like(kl, float("inf")))

    def _smooth(self, d: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero bins (of the first ``i``) get ``EPS``, non-zero ones lose ``EPS * n_zero / n_nonzero``.

        Returns the smoothed ``[cands, bins]`` counts and ``[cands]`` validity: a row with no
        non-zero bin, or one where a bin would turn non-positive, is invalid (``inf`` divergence,
        where MXNet raises and onnxruntime skips the candidate).
        """
        zeros = inside & (d == 0)
        nonzeros = inside & (d != 0)
        n_zero = zeros.sum(dim=1, keepdim=True).double()
        n_nonzero = nonzeros.sum(dim=1, keepdim=True).double()
        eps1 = self.EPS * n_zero / n_nonzero.clamp(min=1)
        out = d + self.EPS * zeros.double() - eps1 * nonzeros.double()
        ok = (n_nonzero[:, 0] > 0) & ~((out <= 0) & inside).any(dim=1)
        return out, ok

    def _threshold_bins(self, hist: torch.Tensor) -> int:
        nq = 1 << (self.bits - 1)
        return nq + int(torch.argmin(self._divergences(hist)))
