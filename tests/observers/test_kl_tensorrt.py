"""``KLObserver`` against the published TensorRT entropy calibration, step by step.

The reference below is the algorithm of Migacz, "8-bit Inference with TensorRT" (GTC 2017,
slides 28-37), transcribed loop by loop as MXNet's ``_get_optimal_threshold`` / onnxruntime's
``get_entropy_threshold`` implement it, for a histogram of ``|x|`` (TensorRT's, one-sided):

    for i in 128 .. bins:
        P = hist[0:i];  P[i-1] += sum(hist[i:])                 # outliers folded into the last bin
        merged = i // 128                                       # bins per int8 level
        Q_level[j] = sum(hist[j*merged:(j+1)*merged]), the remainder into level 127
        Q[b] = Q_level[level(b)] / #non-empty bins of P in that level, 0 where P[b] == 0
        smooth(P), smooth(Q): zeros get eps = 1e-4, non-zeros give eps * n_zero / n_nonzero
        KL(P || Q) on the normalised distributions
    threshold = the edge i with the smallest divergence

Each step has its own test on a hand-made histogram; the whole search is compared with the
vectorised observer on random, heavy-tailed and sparse histograms.
"""

import math

import numpy as np
import pytest
import torch

from llmq.observers import KLObserver

EPS = 1e-4


def ref_p(hist: np.ndarray, i: int) -> np.ndarray:
    p = hist[:i].astype(np.float64).copy()
    p[i - 1] += hist[i:].sum()
    return p


def ref_q(hist: np.ndarray, i: int, nq: int = 128) -> np.ndarray:
    sliced = hist[:i].astype(np.float64)
    p = ref_p(hist, i)
    nonzero = (p != 0).astype(np.int64)
    merged = i // nq
    levels = np.zeros(nq)
    for j in range(nq):
        levels[j] = sliced[j * merged:(j + 1) * merged].sum()
    levels[-1] += sliced[nq * merged:].sum()
    q = np.zeros(i)
    for j in range(nq):
        start = j * merged
        stop = i if j == nq - 1 else start + merged
        norm = nonzero[start:stop].sum()
        if norm:
            q[start:stop] = levels[j] / norm
    q[p == 0] = 0
    return q


def ref_smooth(d: np.ndarray) -> np.ndarray | None:
    zeros = d == 0
    n_zero = zeros.sum()
    n_nonzero = d.size - n_zero
    if n_nonzero == 0:
        return None
    out = d + EPS * zeros - EPS * n_zero / n_nonzero * (~zeros)
    return None if (out <= 0).any() else out


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


def ref_divergences(hist: np.ndarray, nq: int = 128) -> dict[int, float]:
    out = {}
    for i in range(nq, hist.size + 1):
        p, q = ref_smooth(ref_p(hist, i)), ref_smooth(ref_q(hist, i, nq))
        out[i] = math.inf if p is None or q is None else ref_kl(p, q)
    return out


def ref_threshold_bins(hist: np.ndarray) -> int:
    div = ref_divergences(hist)
    return min(div, key=lambda i: (div[i], i))  # first minimum, as np.argmin


def obs_with_bins(bins: int) -> KLObserver:
    return KLObserver(bins=bins)


# ---- step by step ---------------------------------------------------------------------------

def test_step_histogram_is_of_abs_x_with_bins_bins():
    obs = KLObserver(bins=2048)
    x = torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0])
    obs.observe(x)
    assert obs.hist.shape == (1, 2048)
    assert float(obs.range) == 4.0  # max |x|: the negative value sets the range
    h = obs.hist[0]
    assert h.sum() == 5
    assert h[0] == 1 and h[512] == 2 and h[1536] == 1 and h[2047] == 1  # |-1| and |1| share a bin


def test_step_outliers_fold_into_the_last_kept_bin():
    hist = np.zeros(256)
    hist[:10] = 5
    hist[200] = 3
    hist[255] = 4
    p = ref_p(hist, 128)
    assert p.size == 128 and p[127] == 7 and p.sum() == hist.sum()
    kl = obs_with_bins(256)._divergences(torch.tensor(hist, dtype=torch.float64))
    assert kl.shape == (256 - 128 + 1,)  # candidates 128 .. 256, both ends included


def test_step_quantized_distribution_spreads_over_non_empty_bins_only():
    # i = 256 bins -> 2 bins per level; level 0 = bins {0 (count 6), 1 (empty)}
    hist = np.zeros(256)
    hist[0] = 6
    hist[2], hist[3] = 2, 4
    q = ref_q(hist, 256)
    assert q[0] == 6 and q[1] == 0  # the empty bin stays empty
    assert q[2] == q[3] == 3  # the level's 6 spread evenly over its two non-empty bins


def test_step_remainder_bins_join_the_last_level():
    hist = np.ones(300)
    q = ref_q(hist, 300)  # 300 // 128 = 2 bins per level; the last level has 2 + 44 bins
    assert np.allclose(q, 1.0)
    hist[254:] = 0
    hist[299] = 46
    q = ref_q(hist, 300)
    assert q[299] == pytest.approx(46 / 1) and q[254:299].sum() == 0


def test_step_smoothing_gives_zero_bins_eps_and_keeps_the_total():
    d = np.array([4.0, 0.0, 2.0, 0.0])
    s = ref_smooth(d)
    assert s[1] == s[3] == EPS
    assert s.sum() == pytest.approx(d.sum())
    assert ref_smooth(np.zeros(3)) is None


def test_observer_divergences_equal_the_loop_reference_at_every_candidate():
    rng = np.random.default_rng(0)
    hist = np.floor(rng.exponential(50, 512) * (np.arange(512) < 300)).astype(np.float64)
    hist[450] = 2  # an isolated outlier bin
    ref = ref_divergences(hist)
    got = obs_with_bins(512)._divergences(torch.tensor(hist)).numpy()
    want = np.array([ref[i] for i in range(128, 513)])
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all()
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-12)


HISTS = {
    "gaussian": lambda rng: np.histogram(np.abs(rng.normal(size=200_000)), bins=1024)[0],
    "heavy_tail": lambda rng: np.histogram(np.abs(rng.standard_t(2, size=200_000)), bins=1024)[0],
    "massive_outlier": lambda rng: np.histogram(
        np.abs(np.concatenate([rng.normal(size=100_000), [300.0, -250.0]])), bins=1024)[0],
    "sparse": lambda rng: (rng.random(1024) < 0.05) * rng.integers(1, 9, 1024),
    "uniform": lambda rng: np.full(1024, 7),
}


@pytest.mark.parametrize("kind", list(HISTS), ids=list(HISTS))
def test_observer_threshold_equals_the_loop_reference(kind):
    hist = HISTS[kind](np.random.default_rng(1)).astype(np.float64)
    obs = obs_with_bins(1024)
    assert obs._threshold_bins(torch.tensor(hist)) == ref_threshold_bins(hist)


def test_smoothing_makes_an_empty_last_level_finite_not_infinite():
    # counts only in the first bins and one outlier far out: for small i the last level's kept
    # bins are empty but the folded outliers make P > 0 there, so Q = 0 where P > 0. Unsmoothed
    # KL is infinite; smoothed it is large but finite, as in the published implementations.
    hist = np.zeros(512)
    hist[:4] = 1000
    hist[500] = 1
    got = obs_with_bins(512)._divergences(torch.tensor(hist)).numpy()
    assert np.isfinite(got).all()
    ref = ref_divergences(hist)
    np.testing.assert_allclose(got, [ref[i] for i in range(128, 513)], rtol=1e-9)
