"""Observers on synthetic distributions whose answers are known."""

import math

import pytest
import torch

from llmq.observers import (
    SAFE_SCALE, EMAObserver, HistogramObserver, KLObserver, MinMaxObserver, MSEObserver, PercentileObserver,
    make_observer,
)
from llmq.recipes import ObserverKind

ALL_KINDS = [k.value for k in ObserverKind]


def gaussian_with_outliers(n=200_000, n_out=20, at=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[:n_out]
    x[idx] = at * torch.sign(torch.randn(n_out, generator=g))
    return x


def feed(obs, x, batches=8):
    for b in x.chunk(batches):
        obs.observe(b)
    return obs


def test_minmax_is_unsaturated_absmax():
    x = gaussian_with_outliers()
    obs = feed(MinMaxObserver(), x)
    assert obs.threshold().item() == x.abs().max().item() == 40.0
    assert not obs.saturated
    assert obs.scale().item() == pytest.approx(40.0 / 127.5)


@pytest.mark.parametrize("kind", ["percentile", "kl"])
def test_saturated_observers_clip_planted_outliers(kind):
    # 0.01% outliers at 40 sigma: a saturated observer must put T in the Gaussian's
    # tail (a few sigma), far below the outliers; min-max sits on them.
    x = gaussian_with_outliers()
    obs = feed(make_observer(kind, percentile=99.9), x)
    t = obs.threshold().item()
    assert obs.saturated
    assert 2.5 < t < 8.0, t
    assert feed(MinMaxObserver(), x).threshold().item() == 40.0


def test_percentile_matches_quantile_at_bin_resolution():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    obs = feed(PercentileObserver(99.0), x)
    exact = torch.quantile(x.abs(), 0.99).item()
    width = obs.bin_width.item()
    assert exact <= obs.threshold().item() <= exact + 2 * width


def test_percentile_100_is_absmax():
    x = torch.randn(10_000)
    assert feed(PercentileObserver(100.0), x).threshold().item() == x.abs().max().item()


def test_mse_gaussian_optimum_near_aciq():
    # Banner et al. (ACIQ): the MSE-optimal clip of N(0, 1) for 8 bits is ~3.92 sigma,
    # well below the sample max (~4.9 sigma for 10^6 draws).
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(5))
    t = feed(MSEObserver(), x).threshold().item()
    assert 3.5 < t < 4.4, t
    assert t < x.abs().max().item() - 0.3


def test_mse_keeps_frequent_outliers():
    # 1% of values at 10: clipping them costs more than the coarser step
    x = gaussian_with_outliers(n=100_000, n_out=1000, at=10.0)
    assert feed(MSEObserver(), x).threshold().item() > 9.0


def test_kl_uniform_keeps_full_range():
    # a uniform distribution has nothing to clip: KL's best threshold is ~ the max
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    t = feed(KLObserver(), x).threshold().item()
    assert t > 0.9, t


def test_ema_exact_recursion():
    # first batch range 10, then range exactly 1: range_n = 1 + 9 * m^n
    m = 0.8
    obs = EMAObserver(momentum=m)
    obs.observe(torch.tensor([-10.0, 10.0]))
    for n in range(1, 6):
        obs.observe(torch.tensor([-1.0, 0.5, 1.0]))
        assert obs.threshold().item() == pytest.approx(1 + 9 * m**n, rel=1e-6)


def test_ema_converges_to_expected_batch_range():
    # batches of 256 N(0,1) values: EMA of batch max|x| converges to E[max|x| of 256 draws]
    g = torch.Generator().manual_seed(3)
    obs = EMAObserver(momentum=0.9)
    for _ in range(300):
        obs.observe(torch.randn(256, generator=g))
    expected = torch.randn(20_000, 256, generator=g).amax(dim=1).mean().item()
    assert obs.threshold().item() == pytest.approx(expected, rel=0.08)
    assert obs.threshold().item() < feed(MinMaxObserver(), torch.randn(300 * 256, generator=g), 300).threshold()


def test_histogram_range_growth_is_exact_merge():
    # growing the range by powers of two merges bins exactly: same counts as one pass
    a = torch.rand(1000) * 1.0
    b = torch.rand(1000) * 7.0
    grown = HistogramObserver(bins=128)
    grown.observe(a)
    grown.observe(b)
    assert grown.range.item() == pytest.approx(a.max().item() * 8)
    assert grown.hist.sum().item() == 2000
    once = HistogramObserver(bins=128)
    once.range = grown.range.clone()  # same final range, filled in one pass
    once.hist = torch.zeros(1, 128, dtype=torch.float64)
    once.absmax = torch.zeros(1)
    once.num_channels = 1
    once.observe(torch.cat([a, b]))
    torch.testing.assert_close(grown.hist, once.hist, atol=2, rtol=0)  # float edge ties only


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_per_channel_thresholds_follow_channel_scale(kind):
    g = torch.Generator().manual_seed(4)
    mult = torch.tensor([1.0, 4.0, 16.0])
    obs = make_observer(kind, per_channel=True)
    for _ in range(3):
        obs.observe(torch.randn(2, 4000, 3, generator=g) * mult)
    t = obs.threshold()
    assert t.shape == (3,)
    ratio = (t / mult).tolist()
    assert max(ratio) / min(ratio) < 1.5, ratio  # same shape of distribution per channel


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_no_data_is_a_clear_error(kind):
    obs = make_observer(kind)
    with pytest.raises(ValueError, match="observed no data"):
        obs.scale()
    obs.observe(torch.empty(0, 5))  # an empty batch is not data either
    with pytest.raises(ValueError, match="observed no data"):
        obs.threshold()


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_all_zero_gives_documented_safe_scale(kind, per_channel):
    obs = make_observer(kind, per_channel=per_channel)
    obs.observe(torch.zeros(16, 8))
    obs.observe(torch.zeros(16, 8))
    s = obs.scale()
    assert torch.isfinite(s).all() and (s == SAFE_SCALE).all()
    assert (obs.threshold() == 0).all()


@pytest.mark.parametrize("kind", ["percentile", "mse", "kl"])
def test_zeros_then_data(kind):
    # a zero batch first (R = 0) must not break range growth
    obs = make_observer(kind)
    obs.observe(torch.zeros(100))
    obs.observe(torch.randn(10_000))
    t = obs.threshold().item()
    assert 0 < t <= obs.absmax.item() and math.isfinite(t)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, float("nan")]), "NaN/Inf"),
    (torch.tensor([1, 2]), "float tensor"),
], ids=["nan", "int"])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        MinMaxObserver().observe(bad)


def test_channel_count_mismatch():
    obs = MinMaxObserver(per_channel=True)
    obs.observe(torch.randn(4, 3))
    with pytest.raises(ValueError, match="3"):
        obs.observe(torch.randn(4, 5))


def test_make_observer_unknown():
    with pytest.raises(ValueError, match="unknown observer 'foo'"):
        make_observer("foo")
