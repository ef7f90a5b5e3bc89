import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.quant.primitives import (
    choose_qparams,
    dequantize,
    num_groups,
    qmax,
    quantize,
    quantize_weight,
    symmetric_zero,
    to_groups,
)

BITS = [2, 3, 4, 8]


def _scale_per_element(qw):
    n, k = qw.shape
    g = k if qw.group_size is None else qw.group_size
    return qw.scales[:, torch.arange(k) // g]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    group=st.sampled_from([32, 64, 128, None]),
    n=st.integers(1, 8),
    k=st.integers(1, 300),
    spread=st.floats(1e-3, 1e3),
    offset=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_within_half_scale(bits, symmetric, group, n, k, spread, offset, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) + offset) * spread
    qw = quantize_weight(w, bits, group, symmetric)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (n, k)
    assert int(qw.codes.max()) <= qmax(bits)
    err = (qw.dequantize() - w).abs()
    bound = _scale_per_element(qw) / 2
    # fp32 rounding slack relative to the magnitude
    assert (err <= bound * (1 + 1e-5) + w.abs() * 1e-6).all()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_constant_and_zero_groups(bits, symmetric):
    w = torch.zeros(3, 64)
    w[1] = 0.75  # constant non-zero group
    w[2, :32] = -2.5
    qw = quantize_weight(w, bits, 32, symmetric)
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    deq = qw.dequantize()
    assert torch.equal(deq[0], torch.zeros(64)), "all-zero group must dequantize to exact zeros"
    assert ((deq - w).abs() <= _scale_per_element(qw) / 2 + 1e-6).all()


@pytest.mark.parametrize("k", [576, 129, 127, 1])
def test_padded_last_group(k):
    w = torch.randn(4, k)
    qw = quantize_weight(w, 4, 128, symmetric=False)
    assert qw.scales.shape == (4, num_groups(k, 128)) == (4, -(-k // 128))
    # the short last group gets its own parameters from its real elements only
    last = w[:, (num_groups(k, 128) - 1) * 128 :]
    rmin = last.amin(1).clamp(max=0)
    rmax = last.amax(1).clamp(min=0)
    expected = (rmax - rmin) / 15
    # stored scale = the exact one rounded up to fp16
    assert (qw.scales[:, -1] >= expected).all()
    assert torch.allclose(qw.scales[:, -1], expected, rtol=1e-3)
    assert ((qw.dequantize() - w).abs() <= _scale_per_element(qw) / 2 + 1e-6).all()


def test_symmetric_zero_is_fixed_and_full_range_used():
    w = torch.linspace(-1, 1, 64)[None]
    qw = quantize_weight(w, 4, None, symmetric=True)
    assert (qw.zeros == symmetric_zero(4)).all()
    # signed range [-8, 7] around Z = 8: the positive end saturates at 15, the
    # negative end lands on code 0 or 1 (scale rounded up to fp16)
    assert int(qw.codes.min()) <= 1 and int(qw.codes.max()) == 15


def test_seed_formulas_asymmetric():
    """S = (Rmax - Rmin) / Qmax and Z = round(Qmax - Rmax / S), range widened to contain 0."""
    x = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    s, z = choose_qparams(x, 8, symmetric=False, scale_dtype=torch.float32)
    assert torch.allclose(s, torch.tensor([4.0 / 255]))
    assert torch.equal(z, torch.round(255 - 3.0 / s).to(torch.int32))
    q = quantize(x, s[:, None], z[:, None], 8)
    assert torch.allclose(dequantize(q, s[:, None], z[:, None]), x, atol=float(s) / 2)


def test_saturation_clamps_out_of_range_values():
    s, z = torch.tensor([0.1]), torch.tensor([8])
    q = quantize(torch.tensor([100.0, -100.0]), s, z, 4)
    assert q.tolist() == [15, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_rejected_with_module_name(bad):
    w = torch.randn(4, 32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj: weight has 1 NaN/Inf"):
        quantize_weight(w, 4, 32, False, name="model.layers.3.mlp.up_proj")


def test_to_groups_pads_with_zeros():
    w = torch.ones(2, 40)
    grouped = to_groups(w, 32)
    assert grouped.shape == (2, 2, 32)
    assert grouped[:, 1, 8:].abs().sum() == 0
