"""Tiled layout, custom-op registration (fake tensors, torch.compile) and launcher errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.kernels.dequant_gemm import dequant_gemm
from llmq.kernels.dequant_gemv import dequant_gemv
from llmq.kernels.dequant_matmul import dequant_matmul
from llmq.kernels.dequant_tile import TILE_WORDS, repack_tiled, tile_codes, tiled_rows, unrepack_tiled
from llmq.nn.quant_linear import QuantLinear
from llmq.quant.packing import codes_per_word, pack, unpack
from llmq.quant.primitives import quantize_weight


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), k=st.integers(1, 600), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_repack_roundtrip_bit_exact(bits, k, n, seed):
    """Also across column chunks (chunk_n=4 < n)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.int64).to(torch.uint8)
    canonical = pack(codes, bits)
    tiled = repack_tiled(canonical, bits, k, chunk_n=4)
    assert torch.equal(tiled, repack_tiled(canonical, bits, k))
    assert tiled.shape == (tiled_rows(k, bits), n) and tiled.dtype == torch.int32
    assert torch.equal(unrepack_tiled(tiled, bits, k), canonical)
    assert torch.equal(unrepack_tiled(tiled, bits, k, chunk_n=4), canonical)


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_documented_tiled_layout(bits):
    """Tiled word (t*16 + r), field i holds code k = t*16*P + i*16 + r; padding codes are 2**(bits-1)."""
    p, t_codes = codes_per_word(bits), tile_codes(bits)
    k = t_codes + 5
    codes = torch.randint(0, 1 << bits, (k, 3), dtype=torch.int64).to(torch.uint8)
    fields = unpack(repack_tiled(pack(codes, bits), bits, k), bits, tiled_rows(k, bits) * p)  # [rows*P, N]
    for kk in range(2 * t_codes):
        t, rem = divmod(kk, t_codes)
        i, r = divmod(rem, TILE_WORDS)
        want = codes[kk] if kk < k else torch.full((3,), 1 << (bits - 1), dtype=torch.uint8)
        assert torch.equal(fields[(t * TILE_WORDS + r) * p + i], want), kk


def _layer(k=64, n=24, symmetric=False):
    # canonical layout held, which _args reads (the cpu backend, automatic on CPU, holds torch's int4 pack)
    return QuantLinear.from_quantized(quantize_weight(torch.randn(n, k), 4, 32, symmetric), bias=torch.randn(n),
                                      backend="torch")


def _args(layer):
    tiled = repack_tiled(layer.qweight, layer.bits, layer.in_features)
    return tiled, layer.scales, layer.qzeros, layer.bias, layer.bits, layer.effective_group_size, layer.in_features


@pytest.mark.parametrize("op,m", [(dequant_gemv, 3), (dequant_gemm, 20)], ids=["gemv", "gemm"])
def test_custom_op_opcheck(op, m):
    """Schema, fake (meta) implementation and AOT dispatch of the registered torch.library ops."""
    torch.library.opcheck(op, (torch.randn(m, 64), *_args(_layer())))


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = _args(_layer())
    x = torch.randn(40, 64, dtype=torch.float16)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real]
        y = torch.ops.llmq.dequant_gemm(mode.from_tensor(x), *args)
    assert y.shape == (40, 24) and y.dtype == torch.float16


def test_torch_compile_fullgraph(kernel_tol):
    layer = _layer()
    layer.set_backend("triton-interpret")
    x = torch.randn(5, 64)
    expected = layer(x)  # eager call chooses the backend and converts qweight to the tiled layout
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, **kernel_tol[torch.float32])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, "activations must be float16, bfloat16 or float32"),
        (lambda a: {**a, "x": a["x"][:, :32]}, r"x must end in K=64"),
        (lambda a: {**a, "qweight": a["canonical"]}, "tiled int32 layout"),
        (lambda a: {**a, "scales": a["scales"][:1]}, r"scales must be float \[2, 24\]"),
        (lambda a: {**a, "qzeros": a["qzeros"].to(torch.int32)}, r"qzeros must be \[2, 24\] uint8 \(integer zero points\) or float16"),
        (lambda a: {**a, "bias": a["bias"][:5]}, r"bias must be \[24\]"),
        (lambda a: {**a, "bits": 5}, "unsupported bits 5"),
        (lambda a: {**a, "group_size": 24}, "multiple of 16"),
        (lambda a: {**a, "force": "marlin"}, "unknown regime 'marlin'"),
        (lambda a: {**a, "x": torch.randn(17, 64), "force": "gemv"}, "M <= 16"),
        (lambda a: {**a, "split_k": -1}, "split_k must be >= 0"),
    ],
    ids=["int-x", "wrong-K", "canonical-layout", "scales-shape", "qzeros-dtype", "bias-shape", "bits", "group",
         "regime", "gemv-large-M", "split-k"],
)
def test_bad_input_raises(mutate, match):
    layer = _layer()
    tiled, scales, qzeros, bias, bits, group, k = _args(layer)
    a = dict(x=torch.randn(2, 64), qweight=tiled, scales=scales, qzeros=qzeros, bias=bias, bits=bits,
             group_size=group, in_features=k, canonical=layer.qweight)
    a = mutate(a)
    a.pop("canonical")
    with pytest.raises(ValueError, match=match):
        dequant_matmul(**a)


def _route_recorder(monkeypatch, calls):
    """Replace the op and the plain launcher seen by dequant_matmul with recorders around the real ones."""
    import llmq.kernels.dequant_matmul as dm
    for name in ("dequant_gemv", "dequant_gemv_launch", "dequant_gemm", "dequant_gemm_launch"):
        real = getattr(dm, name)
        monkeypatch.setattr(dm, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))


@pytest.mark.parametrize("m", [1, 20], ids=["gemv", "gemm"])
def test_eager_calls_skip_the_dispatcher_unless_a_gradient_is_asked_for(m, monkeypatch):
    """Inference runs the plain launcher (no torch.library round trip); an input that
    requires grad goes through the op, whose missing autograd formula then raises at backward."""
    calls = []
    _route_recorder(monkeypatch, calls)
    layer = _layer()
    layer.set_backend("triton-interpret")
    regime = "gemv" if m == 1 else "gemm"
    with torch.no_grad():
        expected = layer(torch.ones(m, 64))
    assert calls == [f"dequant_{regime}_launch"]
    x = torch.ones(m, 64, requires_grad=True)
    y = layer(x)
    assert calls[-1] == f"dequant_{regime}" and torch.equal(y.detach(), expected)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()
