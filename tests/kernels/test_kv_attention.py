"""Quantized-KV decode kernel (Triton, interpreted on CPU) vs its pure-torch reference."""

import pytest
import torch
import triton
import triton.language as tl
from kv_helpers import make_packed_kv

from llmq.kernels.kv_attention import kv_decode_attention, kv_decode_attention_reference
from llmq.kernels.kv_attention_kernel import _field_codes

# (batch, q heads, kv heads, quantized tokens, residual tokens, splits, block_n)
SHAPES = [
    pytest.param(1, 9, 3, 64, 5, 3, 16, id="smollm2-gqa3-3splits"),
    pytest.param(2, 8, 1, 96, 33, 2, 32, id="gqa8-mqa-residual-straddles-split"),
    pytest.param(1, 4, 4, 0, 37, 2, 16, id="mha-nothing-quantized"),
    pytest.param(1, 4, 2, 128, 1, 1, 16, id="residual-one-token-single-split"),
    pytest.param(2, 4, 2, 160, 3, 5, 16, id="quant-len-not-block-multiple"),
    pytest.param(1, 2, 1, 32, 0, 4, 16, id="no-residual-more-splits-than-blocks"),
    pytest.param(1, 4, 2, 0, 1, 1, 16, id="length-1"),
    pytest.param(2, 2, 2, 32, 0, 1, 16, id="one-key-group-quantized-only"),
    pytest.param(1, 4, 1, 288, 9, 1, 16, id="several-steps-one-split"),
]


@pytest.mark.parametrize("b, hq, hkv, n_quant, n_res, splits, block_n", SHAPES)
@pytest.mark.parametrize("bits, per_channel, symmetric", [
    pytest.param(4, True, False, id="int4-channel-asym"),
    pytest.param(2, False, True, id="int2-token-sym"),
    pytest.param(8, True, True, id="int8-channel-sym"),
])
def test_matches_reference(b, hq, hkv, n_quant, n_res, splits, block_n, bits, per_channel, symmetric, kernel_tol):
    d, group, dtype = 64, 32, torch.float16
    kv = make_packed_kv(b, hkv, n_quant, n_res, d, bits, group, per_channel, symmetric, dtype, spare=32)
    q = torch.randn(b, hq, d).to(dtype)
    out = kv_decode_attention(q, kv, d ** -0.5, num_splits=splits, block_n=block_n)
    ref = kv_decode_attention_reference(q, kv, d ** -0.5)
    assert out.dtype == dtype and out.shape == (b, hq, d)
    torch.testing.assert_close(out, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("bits, per_channel, symmetric, group", [
    pytest.param(4, True, False, 16, id="int4-channel-asym-g16"),
    pytest.param(2, False, True, 32, id="int2-token-sym"),
    pytest.param(8, True, False, 32, id="int8-channel-asym"),
])
def test_masked_groups_match_reference(bits, per_channel, symmetric, group, kernel_tol):
    """Small key groups (several per quantized step), a mask cutting into the quantized part, two splits."""
    d, dtype = 64, torch.float16
    kv = make_packed_kv(2, 2, 160, 7, d, bits, group, per_channel, symmetric, dtype, spare=32)
    q = torch.randn(2, 6, d).to(dtype)
    mask = torch.ones(2, 167, dtype=torch.bool)
    mask[1, :50] = False
    ref = kv_decode_attention_reference(q, kv, d ** -0.5, mask=mask)
    out = kv_decode_attention(q, kv, d ** -0.5, mask=mask, num_splits=2, block_n=16)
    torch.testing.assert_close(out, ref, **kernel_tol[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_dtypes(dtype, kernel_tol):
    d = 32
    kv = make_packed_kv(1, 2, 48, 7, d, 4, 16, True, False, dtype)
    q = torch.randn(1, 6, d).to(dtype)
    out = kv_decode_attention(q, kv, d ** -0.5, num_splits=2, block_n=16)
    torch.testing.assert_close(out, kv_decode_attention_reference(q, kv, d ** -0.5), **kernel_tol[dtype])


def test_padding_mask(kernel_tol):
    """Left padding: masked positions (quantized and residual) must not contribute."""
    d, dtype = 64, torch.float16
    kv = make_packed_kv(2, 2, 64, 9, d, 4, 32, True, False, dtype)
    mask = torch.ones(2, 73, dtype=torch.bool)
    mask[0, :40] = False  # row 0 left-padded into the quantized part
    mask[1, :68] = False  # row 1 padded into the residual window
    q = torch.randn(2, 4, d).to(dtype)
    out = kv_decode_attention(q, kv, d ** -0.5, mask=mask, num_splits=3, block_n=16)
    ref = kv_decode_attention_reference(q, kv, d ** -0.5, mask=mask)
    torch.testing.assert_close(out, ref, **kernel_tol[dtype])
    assert not torch.allclose(ref, kv_decode_attention_reference(q, kv, d ** -0.5), atol=1e-2)


def test_quantization_error_is_small_against_fp_attention():
    """The whole point: int8 attention output stays close to attention on the unquantized cache."""
    d = 64
    kv = make_packed_kv(1, 2, 128, 4, d, 8, 32, True, False, torch.float32)
    q = torch.randn(1, 4, d)
    out = kv_decode_attention(q, kv, d ** -0.5, num_splits=2, block_n=32)
    torch.manual_seed(0)  # regenerate the same float cache, nothing quantized
    fp = make_packed_kv(1, 2, 0, 132, d, 8, 32, True, False, torch.float32)
    ref_fp = kv_decode_attention_reference(q, fp, d ** -0.5)
    sqnr = 10 * torch.log10(ref_fp.pow(2).sum() / (out - ref_fp).pow(2).sum())
    assert sqnr > 30, f"int8 KV attention SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("kw, match", [
    pytest.param(dict(q_shape=(1, 3, 64)), "multiple of KV heads", id="heads"),
    pytest.param(dict(block_n=24), "block_n must be a power of two >= 16", id="block_n"),
    pytest.param(dict(q_shape=(1, 4, 1, 64)), r"q must be \[batch, q_heads, head_dim\]", id="q-4d"),
])
def test_bad_input(kw, match):
    kv = make_packed_kv(1, 2, 32, 2, 64, 4, 32, True, False, torch.float16)
    q = torch.randn(*kw.get("q_shape", (1, 4, 64))).half()
    with pytest.raises(ValueError, match=match):
        kv_decode_attention(q, kv, 0.125, block_n=kw.get("block_n", 16))


def _to_cuda(kv):
    import dataclasses

    return dataclasses.replace(kv, **{f.name: getattr(kv, f.name).cuda() for f in dataclasses.fields(kv)
                                      if isinstance(getattr(kv, f.name), torch.Tensor)})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits, per_channel, symmetric", [
    pytest.param(4, True, False, id="int4-channel-asym"),
    pytest.param(2, True, False, id="int2-channel-asym"),
    pytest.param(8, False, True, id="int8-token-sym"),
])
def test_cuda_long_sequence_gqa(bits, per_channel, symmetric, dtype, kernel_tol):
    """Compiled kernel, default splits / block sizes: 4,160 quantized + 77 residual tokens, GQA 4."""
    d = 128
    kv = _to_cuda(make_packed_kv(2, 8, 4160, 77, d, bits, 64, per_channel, symmetric, dtype, spare=64))
    q = torch.randn(2, 32, d, device="cuda").to(dtype)
    out = kv_decode_attention(q, kv, d ** -0.5)
    torch.testing.assert_close(out, kv_decode_attention_reference(q, kv, d ** -0.5), **kernel_tol[dtype])
    mask = torch.ones(2, 4160 + 77, dtype=torch.bool, device="cuda")
    mask[1, :1000] = False
    out = kv_decode_attention(q, kv, d ** -0.5, mask=mask)
    torch.testing.assert_close(out, kv_decode_attention_reference(q, kv, d ** -0.5, mask=mask), **kernel_tol[dtype])


@triton.jit
def _unpack_kernel(W, OUT, F: tl.constexpr, BITS: tl.constexpr, DOT: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(OUT + offs, _field_codes(tl.load(W + offs), F, BITS, DOT).to(tl.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dot", ["fp16", "fp32"])
def test_field_codes_exact(bits, dot):
    """Every field of random words, in both unpackings the kernel uses (fp16 by the 0x6400 mantissa trick: the
    compiled kernel's fp16 path, which the interpreted launcher never takes since it dots in fp32)."""
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (64,), dtype=torch.int64).to(torch.int32)
    words[:2] = torch.tensor([-1, 0], dtype=torch.int32)  # all ones (sign bit set), all zeros
    dtype = {"fp16": tl.float16, "fp32": tl.float32}[dot]
    for f in range(32 // bits):
        out = torch.empty(64)
        _unpack_kernel[(1,)](words, out, F=f, BITS=bits, DOT=dtype, N=64)
        expect = ((words.to(torch.int64) & 0xFFFFFFFF) >> (f * bits)) & ((1 << bits) - 1)
        assert torch.equal(out, expect.float()), f"field {f}"
