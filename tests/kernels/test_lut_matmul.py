"""Lookup-table matmul (``kernels/lut_matmul.py``, ``lut_gemv.py``, ``lut_scratch.py``) against the pure-torch
reference, under the interpreter: every bit width (1-4) x table kind (shared ``[1, 2**b]`` / per column
``[N, 2**b]``) x activation dtype, in every regime, on awkward shapes.

Tolerances, relative to the largest reference output ``|y|max`` (outputs are O(1) here):
fp32 1e-5 (fp32 FMAs / tf32x3 dots, no rounding of the weight); fp16 2e-3 (~4 fp16 ulps at the top: the
weight is rounded once to fp16, fp16x2 partial sums of at most 16 products at M = 1, one output rounding);
bf16 3e-2 (~4 bf16 ulps: the weight is rounded to bf16 for the dots, and the output).
"""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.kernels import lut_gemv
from llmq.kernels.dequant_tile import repack_tiled, unrepack_tiled
from llmq.kernels.lut_matmul import lut_matmul, lut_matmul_reference
from llmq.quant.packing import pack

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make(bits, kind, k, n, group, scale_dtype=torch.float16, seed=0):
    """Canonical codes, codebook, scales and bias of a random layer (w = codebook[code] · scale)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g)
    rows = 1 if kind == "shared" else n
    codebook = torch.sort(torch.randn(rows, 1 << bits, generator=g), dim=1).values.half()
    scales = ((torch.rand(-(-k // group), n, generator=g) + 0.5) / k ** 0.5).to(scale_dtype)
    bias = torch.randn(n, generator=g)
    return pack(codes, bits), codebook, scales, bias


def check(x, q, cb, s, b, bits, group, k, **kw):
    y = lut_matmul(x, repack_tiled(q, bits, k), cb, s, b, bits, group, k, **kw)
    ref = lut_matmul_reference(x, q, cb, s, b, bits, group, k)
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = TOL[x.dtype] * max(1.0, ref.float().abs().max().item())
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=TOL[x.dtype])


@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["shared", "column"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"int{b}")
def test_matches_reference(bits, kind, dtype, m):
    """K = 300 (not a multiple of the group 64 nor of a tile), N = 40 (not a multiple of a block); M = 1
    (register tables at fp16), 5 (tensor-core dots), 17 (dequantize to scratch + matmul)."""
    k, n, group = 300, 40, 64
    q, cb, s, b = make(bits, kind, k, n, group)
    x = torch.randn(m, k).to(dtype)
    check(x, q, cb, s, b.to(dtype), bits, group, k)


@pytest.mark.parametrize("m", [127, 128, 129])
@pytest.mark.parametrize("bits", [1, 3], ids=lambda b: f"int{b}")
def test_prefill_boundaries(bits, m):
    k, n, group = 160, 24, 32
    q, cb, s, b = make(bits, "column", k, n, group)
    check(torch.randn(m, k).half(), q, cb, s, b.half(), bits, group, k)


@pytest.mark.parametrize("group", [16, 32, 128, 300], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"int{b}")
def test_decode_groups(bits, group):
    """Every group/field relation of the register-table path: a group inside a quad, groups dividing the
    tile, groups spanning tiles, per channel (group = K = 300, a padded last tile)."""
    k, n = 300, 136
    q, cb, s, b = make(bits, "column", k, n, group, seed=group)
    pl = lut_gemv.plan(1, n, k, bits, group, s.shape[0], True, torch.float16, True, 1)
    assert pl.constexprs["PACKED"]
    check(torch.randn(1, k).half(), q, cb, s, b.half(), bits, group, k)


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k_and_bias_added_once(split_k):
    k, n = 1024, 40
    q, cb, s, b = make(4, "shared", k, n, 128)
    check(torch.randn(1, k).half(), q, cb, s, 100 * b.half(), 4, 128, k, split_k=split_k)
    check(torch.randn(3, k), q, cb, s, 100 * b, 4, 128, k, split_k=split_k)


def test_deterministic_partials():
    k, n = 1024, 40
    q, cb, s, b = make(2, "column", k, n, 64)
    x = torch.randn(1, k).half()
    torch.use_deterministic_algorithms(True)
    try:
        pl = lut_gemv.plan(1, n, k, 2, 64, s.shape[0], True, x.dtype, True, 1, split_k=4, deterministic=True)
        assert pl.mode == lut_gemv.OUT_PARTIALS
        check(x, q, cb, s, b.half(), 2, 64, k, split_k=4)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_other_scale_dtypes(scale_dtype):
    k, n = 300, 40
    q, cb, s, b = make(3, "shared", k, n, 64, scale_dtype)
    assert not lut_gemv.packed(torch.float16, scale_dtype, 1)
    check(torch.randn(1, k).half(), q, cb, s, b.half(), 3, 64, k)


def test_three_d_input_and_forced_regimes():
    k, n = 300, 40
    q, cb, s, b = make(2, "shared", k, n, 64)
    x = torch.randn(2, 3, k).half()
    for force in ("gemv", "scratch"):
        check(x, q, cb, s, b.half(), 2, 64, k, force=force)
    with pytest.raises(ValueError, match="M <= 16"):
        lut_matmul(torch.randn(17, k).half(), repack_tiled(q, 2, k), cb, s, None, 2, 64, k, force="gemv")


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4]), kind=st.sampled_from(["shared", "column"]), m=st.integers(1, 20),
       k=st.integers(1, 400), n=st.integers(1, 70), group=st.sampled_from([16, 32, 64, 128, 0]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 1000))
def test_property_random_shapes(bits, kind, m, k, n, group, dtype, seed):
    group = group or k  # 0: per channel
    q, cb, s, b = make(bits, kind, k, n, group, seed=seed)
    check(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype), q, cb, s, b.to(dtype), bits,
          group, k)


def test_one_bit_tiled_layout_round_trip():
    codes = torch.randint(0, 2, (1000, 33))
    q = pack(codes, 1)
    tiled = repack_tiled(q, 1, 1000)
    assert tiled.shape == (32, 33)  # 2 tiles of 512 features, 16 word rows each
    assert torch.equal(unrepack_tiled(tiled, 1, 1000), q)


def test_bad_arguments():
    k, n = 64, 8
    q, cb, s, b = make(2, "shared", k, n, 32)
    t = repack_tiled(q, 2, k)
    x = torch.randn(1, k).half()
    with pytest.raises(ValueError, match="codebook"):
        lut_matmul(x, t, cb.float(), s, None, 2, 32, k)
    with pytest.raises(ValueError, match="codebook"):
        lut_matmul(x, t, torch.zeros(3, 4).half(), s, None, 2, 32, k)
    with pytest.raises(ValueError, match="unsupported bits"):
        lut_matmul(x, repack_tiled(pack(torch.zeros(k, n, dtype=torch.long), 8), 8, k), cb, s, None, 8, 32, k)
    with pytest.raises(ValueError, match="unknown regime"):
        lut_matmul(x, t, cb, s, None, 2, 32, k, force="gemm")


def test_triton_backend_routes_codebook_layers():
    """``TritonBackend.forward`` sends a layer with a ``codebook`` to the LUT kernels (a stand-in object with
    the attributes the backend reads; QuantLinear's codebook buffer lands with the levels work)."""
    from llmq.nn.triton_backend import TritonInterpreterBackend
    k, n = 300, 40
    q, cb, s, b = make(4, "column", k, n, 64)
    layer = SimpleNamespace(qweight=repack_tiled(q, 4, k), codebook=cb, scales=s, zero_points=None, bias=b.half(),
                            bits=4, effective_group_size=64, in_features=k)
    x = torch.randn(2, k).half()
    y = TritonInterpreterBackend().forward(layer, x)
    ref = lut_matmul_reference(x, q, cb, s, b.half(), 4, 64, k)
    torch.testing.assert_close(y.float(), ref.float(), atol=TOL[torch.float16] * ref.abs().max().item(), rtol=2e-3)
    layer.zero_points = torch.zeros(s.shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no zero points"):
        TritonInterpreterBackend().forward(layer, x)
