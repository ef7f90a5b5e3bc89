"""Triton per-token / per-tensor activation quantization vs the pure-torch reference (bit-exact)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.kernels.act_quant import act_quant, act_quant_reference
from llmq.kernels.aot import TARGETS

from _w8a8_aot import aot_usage  # tests/kernels is on sys.path (rootdir-relative test modules)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 16), (3, 127), (5, 128), (2, 129), (7, 576), (4, 1500)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dynamic_bit_exact(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    x[0, 0] = 40  # an outlier sets its row's scale
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_reference(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_static_bit_exact_and_saturates(dtype):
    x = (torch.randn(9, 200) * 2).to(dtype)
    x[3, 7] = 100  # beyond the static range: saturates at 127
    scale = torch.tensor(4.0 / 127.5)
    q, s = act_quant(x, scale)
    q_ref, _ = act_quant_reference(x, scale)
    assert torch.equal(q, q_ref)
    assert q[3, 7] == 127 and s.shape == (1,)


def test_reference_error_bound_and_ties():
    x = torch.randn(64, 96)
    q, s = act_quant_reference(x)
    err = (q.float() * s[:, None] - x).abs()
    assert (err <= s[:, None] / 2 + 1e-6 * x.abs()).all()  # + fp32 rounding of q * s
    # exact halves round to even, like torch.round / the primitives
    half = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 127.5]])
    q, _ = act_quant(half, torch.tensor(1.0))
    assert q.tolist() == [[0, 2, 2, 0, -2, 127]]


def test_all_zero_rows_and_empty():
    x = torch.zeros(3, 40)
    x[1] = torch.linspace(-1, 1, 40)
    q, s = act_quant(x)
    assert s[0] == 1.0 and s[2] == 1.0 and (q[0] == 0).all()
    q, s = act_quant(torch.zeros(0, 40))
    assert q.shape == (0, 40) and s.shape == (0,)


def test_strided_rows():
    base = torch.randn(6, 300)
    x = base[:, 10:210]  # row stride 300, unit column stride
    assert torch.equal(act_quant(x)[0], act_quant_reference(x)[0])


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 300), mag=st.floats(1e-3, 1e3))
def test_hypothesis_roundtrip(m, k, mag):
    x = torch.randn(m, k) * mag
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6 * x.abs()).all()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 4, dtype=torch.int32), "float16, bfloat16 or float32"),
    (torch.zeros(2, 3, 4), "2-D"),
], ids=["int", "3d"])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        act_quant(bad)


def test_static_scale_must_be_scalar():
    with pytest.raises(ValueError, match="one value"):
        act_quant(torch.zeros(2, 4), torch.ones(2))


def test_aot_compiles_without_spills():
    from llmq.kernels.act_quant import MIN_SCALE
    sig = {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
           "stride_qm": "i32", "STATIC": "constexpr", "MIN_S": "constexpr", "BLOCK_K": "constexpr"}
    aligned = ["x_ptr", "q_ptr", "scale_ptr", "stride_xm", "stride_qm"]
    cases = [(sig, {"STATIC": static, "MIN_S": MIN_SCALE, "BLOCK_K": 1024}, cap, 4, 3, aligned)
             for _, cap in TARGETS for static in (False, True)]
    for case, usage in zip(cases, aot_usage("llmq.kernels.act_quant", "_act_quant_kernel", cases)):
        assert usage["local_bytes"] == 0 and usage["stack_bytes"] == 0, (case[1:], usage)
        assert usage["registers"] <= 128, usage


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cuda_bit_exact(dtype):
    """Compiled kernel: IEEE division (div_rn) keeps it bit-exact with torch on the GPU too."""
    x = (torch.randn(37, 4097, device="cuda") * 3).to(dtype)
    x[0, 0] = 40
    q, s = act_quant(x)
    q_ref, s_ref = act_quant_reference(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    scale = torch.tensor(0.05, device="cuda")
    assert torch.equal(act_quant(x, scale)[0], act_quant_reference(x, scale)[0])
