"""Non-linear weight levels (``llmq.quant.levels``): tables, exact nearest-level rounding, k-means,
scales, and GPTQ's error feedback with codebooks."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.algorithms.gptq import GPTQ
from llmq.quant.levels import (
    fit_kmeans, level_params, level_table, lookup, nearest_level, quantize_weight_levels, refit_codebook,
    weighted_error,
)
from llmq.recipes import LEVEL_BITS, Levels, WeightRecipe

TABLES = [(kind, bits) for kind in (Levels.NF, Levels.LOG2, Levels.BINARY) for bits in LEVEL_BITS[kind]]
ALL = [(kind, bits) for kind in LEVEL_BITS for bits in LEVEL_BITS[kind]]


@pytest.mark.parametrize("kind,bits", TABLES, ids=[f"{k.value}{b}" for k, b in TABLES])
def test_tables_are_ascending_fp16_valued_and_span_minus_one_to_one(kind, bits):
    t = level_table(kind, bits)
    assert t.shape == (1 << bits,) and t.dtype == torch.float32
    assert torch.all(t[1:] > t[:-1])
    assert torch.equal(t, t.half().float())
    assert t[0] == -1 and t[-1] == 1


def test_nf4_is_the_qlora_table():
    # bitsandbytes' NF4 (QLoRA, appendix E), to fp16 precision
    nf4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1848164, -0.0910500, 0.0,
           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    torch.testing.assert_close(level_table("nf", 4), torch.tensor(nf4), atol=5e-4, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_has_an_exact_zero_and_log2_is_signed_powers_of_two(bits):
    assert 0.0 in level_table("nf", bits).tolist()
    mags = level_table("log2", bits).abs()
    assert torch.equal(torch.log2(mags), torch.log2(mags).round())
    assert sorted(level_table("log2", bits).tolist()) == sorted((-level_table("log2", bits)).tolist())


def _brute_nearest(x: float, row: list[float]) -> int:
    """Exact arithmetic: the first index of the least |x - c| (ties to the lower entry)."""
    d = [abs(Fraction(x) - Fraction(c)) for c in row]
    return d.index(min(d))


fp16 = st.floats(-60000, 60000, allow_nan=False, width=16)
fp32 = st.floats(-1e5, 1e5, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.lists(fp16, min_size=2, max_size=16, unique=True), st.lists(fp32, min_size=1, max_size=20))
def test_nearest_level_is_exact_against_a_brute_force_reference(row, xs):
    row = sorted(row)
    # add the exact midpoints that fp32 holds: there rounding must go to the lower entry
    mids = [(Fraction(a) + Fraction(b)) / 2 for a, b in zip(row, row[1:])]
    xs = xs + [float(m) for m in mids if Fraction(torch.tensor(float(m)).item()) == m]
    x = torch.tensor([xs], dtype=torch.float32)
    got = nearest_level(x, torch.tensor([row]))[0].tolist()
    assert got == [_brute_nearest(v, row) for v in x[0].tolist()]


def test_nearest_level_per_row_codebooks_and_ties_to_the_lower_entry():
    cb = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 2.0, 4.0]])
    x = torch.tensor([[-0.5, 0.5, 0.75], [1.0, 3.0, 3.5]])  # every value but 0.75 and 3.5 is a tie
    assert nearest_level(x, cb).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert lookup(nearest_level(x, cb), cb).tolist() == [[-1.0, 0.0, 1.0], [0.0, 2.0, 4.0]]
    with pytest.raises(ValueError, match="codebook has 2 rows"):
        nearest_level(torch.zeros(3, 2), cb)


@pytest.mark.parametrize("weighted", [False, True], ids=["data-free", "weighted"])
def test_kmeans_objective_is_never_worse_than_its_init(weighted):
    x = torch.randn(40, 300) * torch.rand(40, 1)
    w = torch.rand(40, 300) if weighted else torch.ones(40, 300)
    init = level_table("nf", 3)
    cb = fit_kmeans(x, w, init)
    assert cb.shape == (40, 8) and torch.equal(cb, cb.half().float())
    assert torch.all(cb[:, 1:] >= cb[:, :-1])
    before = weighted_error(x, init.half().float()[None].expand(40, -1).contiguous(), w)
    after = weighted_error(x, cb, w)
    assert torch.all(after <= before)
    assert after.sum() < 0.8 * before.sum()  # and it does learn something on these rows


def test_binary_scale_is_the_mean_absolute_value_and_is_optimal():
    w = torch.randn(8, 128)
    scales, cb = level_params(w, "binary", 1, 64)
    torch.testing.assert_close(scales, w.abs().reshape(8, 2, 64).mean(-1), atol=1e-3, rtol=1e-3)
    assert cb.tolist() == [[-1.0, 1.0]]
    qw = quantize_weight_levels(w, "binary", 1, 64)
    err = ((qw.dequantize() - w) ** 2).sum()
    for f in (0.9, 1.1):
        assert ((torch.sign(w) * qw.scales.repeat_interleave(64, 1) * f - w) ** 2).sum() > err


@pytest.mark.parametrize("kind,bits", ALL, ids=[f"{k.value}{b}" for k, b in ALL])
@pytest.mark.parametrize("n,k,group", [(1, 100, 64), (7, 129, None), (5, 64, 32)], ids=["N1-K100-g64", "chan", "g32"])
def test_quantize_weight_levels_shapes_and_reconstruction(kind, bits, n, k, group):
    w = torch.randn(n, k)
    qw = quantize_weight_levels(w, kind, bits, group, search=True)
    groups = 1 if group is None else -(-k // group)
    assert qw.codes.shape == (n, k) and qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 1 << bits
    assert qw.scales.shape == (n, groups) and qw.zeros is None and qw.symmetric
    assert qw.codebook.shape == (n if kind is Levels.KMEANS else 1, 1 << bits)
    # codes are the nearest levels of w / scale
    idx = torch.arange(k) // (k if group is None else group)
    assert torch.equal(qw.codes.long(), nearest_level(w / qw.scales[:, idx], qw.codebook))
    rel = ((qw.dequantize() - w) ** 2).sum() / (w**2).sum()
    assert rel < {1: 0.5, 2: 0.5, 3: 0.3, 4: 0.15}[bits]


def _planted(n=48, k=200, t=1024):
    """A weight and correlated calibration inputs (some features much louder than others)."""
    x = (torch.randn(t, k) @ torch.randn(k, k) * 0.2 + torch.randn(t, k)) * torch.linspace(0.2, 3, k)
    return torch.randn(n, k), x


def _output_error(w, x, qw):
    return ((x @ (w - qw.dequantize()).T) ** 2).sum().item()


@pytest.mark.parametrize("kind,bits", ALL, ids=[f"{k.value}{b}" for k, b in ALL])
def test_gptq_with_levels_beats_rounding_to_the_nearest_level(kind, bits):
    w, x = _planted()
    rtn = quantize_weight_levels(w, kind, bits, 64)
    gptq = GPTQ(w, bits, 64, True, levels=kind.value)
    gptq.add_batch(x)
    qw = gptq.quantize()
    assert qw.levels == kind.value and qw.codebook.shape == rtn.codebook.shape
    assert _output_error(w, x, qw) <= _output_error(w, x, rtn)


def test_gptq_kmeans_feedback_and_refit_each_help():
    w, x = _planted()
    errs = {}
    for name, kw in {"nearest": dict(error_feedback=False, refit=False), "feedback": dict(refit=False),
                     "refit": {}}.items():
        g = GPTQ(w, 3, None, True, levels="kmeans", **kw)
        g.add_batch(x)
        errs[name] = _output_error(w, x, g.quantize())
    assert errs["refit"] <= errs["feedback"] < errs["nearest"]


def test_refit_codebook_never_raises_the_output_error_and_renumbers_codes():
    w, x = _planted(n=16, k=96)
    qw = quantize_weight_levels(w, "kmeans", 2, 32)
    H = x.T @ x
    cb, codes = refit_codebook(w, qw.codes, qw.scales, qw.codebook, H, 32)
    assert torch.all(cb[:, 1:] >= cb[:, :-1])
    idx = torch.arange(96) // 32
    new = lookup(codes, cb) * qw.scales[:, idx]
    before = torch.einsum("nk,kj,nj->n", w - qw.dequantize(), H, w - qw.dequantize())
    after = torch.einsum("nk,kj,nj->n", w - new, H, w - new)
    assert torch.all(after <= before * (1 + 1e-5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "levels='binary'"),
    (dict(bits=3, levels="binary", symmetric=True), "pass bits=1"),
    (dict(bits=8, levels="nf", symmetric=True), "choose bits from"),
    (dict(bits=3, levels="kmeans"), "symmetric=True"),
    (dict(bits=3, levels="nf", symmetric=True, method="awq"), "uniform grid only"),
    (dict(bits=3, levels="cubic", symmetric=True), "unknown levels"),
], ids=["1bit-uniform", "binary-3bit", "nf-8bit", "asym", "awq", "unknown"])
def test_recipe_refuses_combinations_that_make_no_sense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightRecipe(**kwargs)


def test_recipe_round_trips_levels_and_old_configs_load_as_uniform():
    r = WeightRecipe(bits=1, group_size=64, symmetric=True, levels="binary", method="gptq")
    assert WeightRecipe.from_dict(r.to_dict()) == r and r.to_dict()["levels"] == "binary"
    old = WeightRecipe(4, 64, True).to_dict()
    del old["levels"]
    assert WeightRecipe.from_dict(old).levels is Levels.UNIFORM
