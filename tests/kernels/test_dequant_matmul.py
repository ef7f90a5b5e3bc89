"""Fused dequantize-matmul kernels (interpreter) vs the pure-torch reference on the same packed weights.

Shapes are kept small (K <= 300, N <= 200) for the interpreter; K = 300 leaves a padded last group
for every group size and a partial last tile for every bit width, N = 70 / 200 are not multiples of
any BLOCK_N. Every axis (bits, group, symmetry, dtype, M, regime, split-K, bias) is covered; the full
cross-product only where cheap.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.kernels.dequant_matmul import DECODE_MAX_M, dequant_matmul, regime_for
from llmq.kernels.dequant_tile import dequant_matmul_reference, repack_tiled
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.primitives import quantize_weight

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, 256, None]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
MS = [1, 2, 7, 16, 17, 64, 129]


def _gid(g):
    return "perchannel" if g is None else f"g{g}"


def _did(d):
    return str(d).removeprefix("torch.")


def make_layer(k, n, bits, group, symmetric, bias=True):
    """A QuantLinear from RTN-quantized random weights (scaled so outputs stay O(1..10))."""
    w = torch.randn(n, k) / k**0.5
    qw = quantize_weight(w, bits, group, symmetric)
    # the torch backend holds the canonical layout these tests read (the cpu backend, automatic on CPU,
    # would convert qweight to torch's int4 pack)
    return QuantLinear.from_quantized(qw, bias=torch.randn(n) if bias else None, backend="torch")


def run_both(layer, x, **kw):
    """(kernel output, reference output) for one layer and input."""
    tiled = repack_tiled(layer.qweight, layer.bits, layer.in_features)
    args = (layer.scales, layer.zero_points, layer.bias, layer.bits, layer.effective_group_size, layer.in_features)
    y = dequant_matmul(x, tiled, *args, **kw)
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    return y, ref


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("m", [1, 17], ids=["decode-M1", "prefill-M17"])
def test_every_bits_group_symmetry(m, bits, group, symmetric, kernel_tol):
    layer = make_layer(300, 70, bits, group, symmetric)
    x = torch.randn(m, 300)
    y, ref = run_both(layer, x)
    assert y.dtype == torch.float32 and y.shape == (m, 70)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("group", [64, None], ids=_gid)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("m", [1, 17], ids=["decode-M1", "prefill-M17"])
def test_float_zero_points(m, bits, group, dtype, kernel_tol):
    """HQQ-style float zeros (fp16 buffer): the kernels subtract them exactly, not rounded to integers
    (the integer-zero path folds the zero into a 2**23 magic-number subtraction that would round it)."""
    from llmq.algorithms import HQQ

    w = torch.randn(70, 300) / 300**0.5
    layer = QuantLinear.from_quantized(HQQ(w, bits, group, symmetric=False).quantize(), bias=torch.randn(70),
                                       backend="torch")  # canonical layout held (see make_layer)
    assert layer.zeros is not None and layer.qzeros is None and layer.zeros.dtype == torch.float16
    assert (layer.zeros.float() != layer.zeros.float().round()).any()
    x = torch.randn(m, 300).to(dtype)
    y, ref = run_both(layer, x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, **kernel_tol[dtype])
    if dtype == torch.float32:  # the kernel follows the float zeros, not zeros rounded to integers
        rounded = dequant_matmul_reference(x, layer.qweight, layer.scales, layer.zeros.float().round().half(),
                                           layer.bias, bits, layer.effective_group_size, 300)
        assert (y - rounded).abs().max() > 10 * (y - ref).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
def test_every_m_and_dtype(m, dtype, kernel_tol):
    """4-bit g64 asymmetric with bias, both regimes across the crossover, every activation dtype."""
    layer = make_layer(300, 200, 4, 64, symmetric=False)
    x = torch.randn(m, 300).to(dtype)
    y, ref = run_both(layer, x)
    assert y.dtype == dtype and y.shape == (m, 200)
    torch.testing.assert_close(y, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("m", [2, 64], ids=["M2", "M64"])
def test_every_bits_and_dtype(m, bits, dtype, kernel_tol):
    layer = make_layer(200, 70, bits, 128, symmetric=True, bias=False)
    x = torch.randn(m, 200).to(dtype)
    y, ref = run_both(layer, x)
    torch.testing.assert_close(y, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("m", [1, 7], ids=["M1-fma", "M7-dot"])
@pytest.mark.parametrize("split_k", [1, 2, 3, 64], ids=lambda s: f"split{s}")
def test_split_k_adds_bias_once(m, split_k, kernel_tol):
    """K splits accumulate with atomics; only one split adds the bias (a large bias makes a double add fail)."""
    layer = make_layer(520, 40, 4, 32, symmetric=False)  # 5 tiles of 128 features
    layer.bias.fill_(100.0)
    x = torch.randn(m, 520).to(torch.float16)
    y, ref = run_both(layer, x, force="gemv", split_k=split_k)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float16])


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("m", [1, 7], ids=["M1-fma", "M7-dot"])
@pytest.mark.parametrize("split_k", [1, 3, 64], ids=lambda s: f"split{s}")
def test_deterministic_split_k_sums_partials(m, split_k, deterministic, kernel_tol, monkeypatch):
    """Under torch.use_deterministic_algorithms the splits write fp32 partials (no atomics), summed in
    a fixed order by torch; one split adds the bias."""
    import llmq.kernels.dequant_gemv as gemv
    modes = []
    monkeypatch.setattr(gemv, "_tuned", {path: _recording(kernel, modes) for path, kernel in gemv._tuned.items()})
    layer = make_layer(520, 40, 4, 32, symmetric=False)
    layer.bias.fill_(100.0)
    x = torch.randn(m, 520).to(torch.float16)
    y, ref = run_both(layer, x, force="gemv", split_k=split_k)
    assert modes == [gemv.STORE if split_k == 1 else gemv.PARTIALS]
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float16])


def _recording(kernel, modes):
    """Wraps an autotuned kernel so that each launch records its OUT_MODE."""
    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                modes.append(kw["OUT_MODE"])
                return kernel[grid](*args, **kw)
            return launch
    return Recorder()


@pytest.mark.gpu
def test_cuda_deterministic_split_k_is_bitwise_reproducible(deterministic):
    layer = make_layer(8192, 1024, 4, 128, symmetric=False).cuda()
    x = torch.randn(4, 8192, device="cuda", dtype=torch.float16)
    first, _ = run_both(layer, x, force="gemv", split_k=16)
    for _ in range(20):
        assert torch.equal(run_both(layer, x, force="gemv", split_k=16)[0], first)


@pytest.mark.parametrize("regime", ["gemv", "gemm"])
@pytest.mark.parametrize("m", [1, 16], ids=lambda m: f"M{m}")
def test_forced_regime(m, regime, kernel_tol):
    layer = make_layer(96, 48, 8, 32, symmetric=False)
    x = torch.randn(m, 96)
    y, ref = run_both(layer, x, force=regime)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float32])


def test_regime_rule():
    assert regime_for(1) == "gemv" and regime_for(DECODE_MAX_M) == "gemv" and regime_for(DECODE_MAX_M + 1) == "gemm"


def test_leading_dims_and_empty(kernel_tol):
    layer = make_layer(64, 24, 4, 32, symmetric=True)
    x = torch.randn(2, 3, 64)
    y, ref = run_both(layer, x)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float32])
    y0, _ = run_both(layer, torch.randn(0, 64))
    assert y0.shape == (0, 24)


def test_noncontiguous_rows(kernel_tol):
    """A strided view of x (rows not adjacent, last dim contiguous) is read in place."""
    layer = make_layer(64, 24, 4, 32, symmetric=False)
    x = torch.randn(5, 128)[:, :64]
    y, ref = run_both(layer, x)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_did)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
@pytest.mark.parametrize("m", [1, 4, 16, 17, 512], ids=lambda m: f"M{m}")
def test_cuda_llm_sized(m, bits, dtype, kernel_tol):
    """On a GPU: LLM-sized layers (autotuned configs, automatic split-K) against the reference."""
    layer = make_layer(4096, 5120, bits, 128, symmetric=bits != 4).cuda()
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    y, ref = run_both(layer, x)
    torch.testing.assert_close(y, ref, **kernel_tol[dtype])


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from(BITS), group=st.sampled_from(GROUPS), symmetric=st.booleans(), k=st.integers(1, 160),
       n=st.integers(1, 40), m=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_property(bits, group, symmetric, k, n, m, seed):
    """Any K (down to 1), N, M on either side of the crossover: kernel == reference (fp32, tolerance of conftest)."""
    from conftest import KERNEL_TOLERANCES

    torch.manual_seed(seed)
    layer = make_layer(k, n, bits, group, symmetric)
    y, ref = run_both(layer, torch.randn(m, k))
    torch.testing.assert_close(y, ref, **KERNEL_TOLERANCES[torch.float32])
