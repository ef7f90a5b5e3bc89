"""The bf16 decode path (``kernels/dequant_bf16x2.py``): bf16 activations, fp16 scales, 2/4/8 bits.

Checked here: (1) the interpreter twin (``ASM = False``) equals, bit for bit, an independent torch model of
the PTX it stands for (``fma.rn.bf16x2``, and fp32 ``add/mul.rn`` + ``cvt.rn.bf16x2.f32`` for 8 bits: each
one rounding of the exact result), and that model equals the fp32 reference weight rounded once to bf16
for integer / no zeros; (2) the decode kernel on the path vs the fp32 reference for every bit width,
zero-point kind, group size and awkward shape, and that the launcher took the path; (3) on a GPU, the
inline assembly against the same torch model.
"""

import pytest
import torch
import triton
import triton.language as tl
from layer_helpers import make_layer
from llmq.kernels import dequant_gemv
from llmq.kernels.dequant_bf16x2 import dequant_field_bf16, group_rows_bf16, round_bf16
from llmq.kernels.dequant_f16x2 import ZERO_FLOAT, ZERO_INT, ZERO_NONE
from llmq.kernels.dequant_matmul import dequant_matmul
from llmq.kernels.dequant_tile import dequant_matmul_reference, repack_tiled

KINDS = {"none": ZERO_NONE.value, "int": ZERO_INT.value, "float": ZERO_FLOAT.value}


@triton.jit
def _field_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, I: tl.constexpr, BITS: tl.constexpr, ZERO_KIND: tl.constexpr,
                  ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_r = tl.arange(0, 16)
    offs_n = tl.arange(0, BLOCK_N)
    words = tl.load(w_ptr + offs_r[:, None] * N + offs_n[None, :])
    rows = group_rows_bf16(s_ptr, z_ptr, 0, offs_n, offs_n < N, N, BITS, ZERO_KIND, ASM)
    w = dequant_field_bf16(words, I, rows, BITS, ZERO_KIND, ASM)
    tl.store(out_ptr + offs_r[:, None] * N + offs_n[None, :], w)


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, round_bf16(tl.load(x_ptr + offs)))


def _torch_model(words, i, bits, s, z, kind):
    """What the PTX computes, step by step in torch (float64 holds every exact intermediate; torch's
    float64 → bfloat16 conversion rounds once, to nearest even)."""
    codes = ((words >> (i * bits)) & ((1 << bits) - 1)).double()
    s = s.double()
    if bits == 8:  # fp32: (code - zero) · scale, each op rounded as fp32, then one bf16 rounding
        zero = torch.full_like(s, 128.0) if kind == "none" else z.double()
        return ((codes.float() - zero.float()) * s.float()).bfloat16()
    s_hi = s.bfloat16().double()
    s_lo = (s - s_hi).bfloat16().double()
    assert torch.equal(s_hi + s_lo, s)  # the split is exact
    if kind == "float":
        nzs = (-(z.double() * s)).bfloat16().double()
        p = (codes * s_lo + nzs).bfloat16().double()
        return (codes * s_hi + p).bfloat16()
    zero = torch.full_like(s, 1 << (bits - 1)) if kind == "none" else z.double()
    d = codes - zero
    p = (d * s_lo).bfloat16().double()
    assert torch.equal(p, d * s_lo)  # exact: ≤ 4 + 3 significant bits
    return (d * s_hi + p).bfloat16()


def _inputs(bits, kind, n=64):
    g = torch.Generator().manual_seed(bits * 10 + len(kind))
    words = torch.randint(-2**31, 2**31 - 1, (16, n), dtype=torch.int32, generator=g)
    s = (torch.rand(n, generator=g) * 0.1 + 1e-3).half()
    if kind == "float":
        z = (torch.rand(n, generator=g) * ((1 << bits) - 1)).half()
        z[:4] = torch.tensor([0.0, 6e-8, 1e-3, (1 << bits) - 1])  # a subnormal zero: its product spans > 24 bits
    else:
        z = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=g)
    return words, s, z


def test_round_bf16_is_round_to_nearest_even():
    """The interpreter truncates fp32 → bf16; ``round_bf16`` rounds like torch (ties included)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 0x7F00_0000, (4096,), dtype=torch.int32, generator=g)
    bits[:1024] = (bits[:1024] & ~0xFFFF) | 0x8000  # exact ties
    bits[1024:2048] |= torch.iinfo(torch.int32).min  # negative values
    x = bits.view(torch.float32)
    out = torch.empty(4096, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, out, 4096)
    assert torch.equal(out.view(torch.int16), x.bfloat16().view(torch.int16))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_interpreter_twin_is_bit_exact(bits, kind):
    """Every field: the ASM = False code gives the PTX model's bits; for integer / no zeros that is the
    reference's fp32 weight rounded once to bf16."""
    words, s, z = _inputs(bits, kind)
    for i in range(32 // bits):  # int3: 10 fields, 3 of them read from words >> 4
        out = torch.empty(16, 64, dtype=torch.bfloat16)
        _field_kernel[(1,)](words, s, z, out, 64, I=i, BITS=bits, ZERO_KIND=KINDS[kind], ASM=False, BLOCK_N=64)
        ref = _torch_model(words, i, bits, s, z, kind)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (bits, kind, i)
        if kind != "float":
            zero = 1 << (bits - 1) if kind == "none" else z.float()
            codes = ((words >> (i * bits)) & ((1 << bits) - 1)).float()
            assert torch.equal(ref.view(torch.int16), ((codes - zero) * s.float()).bfloat16().view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_inline_asm_is_bit_exact_on_gpu(bits, kind):
    words, s, z = _inputs(bits, kind)
    for i in range(32 // bits):
        out = torch.empty(16, 64, dtype=torch.bfloat16, device="cuda")
        _field_kernel[(1,)](words.cuda(), s.cuda(), z.cuda(), out, 64, I=i, BITS=bits, ZERO_KIND=KINDS[kind], ASM=True,
                            BLOCK_N=64)
        ref = _torch_model(words, i, bits, s, z, kind)
        assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16)), (bits, kind, i)


@pytest.mark.parametrize("k,n", [(300, 70), (520, 129)], ids=["K300-N70", "K520-N129"])
@pytest.mark.parametrize("m", [1, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("group", [32, 128, None], ids=lambda g: "perchannel" if g is None else f"g{g}")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_packed_bf16_decode_matches_reference(bits, kind, group, m, k, n, kernel_tol):
    layer = make_layer(k, n, bits, group, kind)
    pl = dequant_gemv.plan(m, n, k, bits, layer.effective_group_size, layer.scales.shape[0], torch.bfloat16,
                           layer.zero_points is not None, True, 1, float_zeros=kind == "float")
    on_path = not (bits == 8 and kind == "float")  # (an 8-byte stack frame on sm_90a under triton 3.6)
    assert pl.constexprs["PACKED"] == on_path and not pl.constexprs["ASM"]
    assert pl.constexprs["BLOCK_M"] == 16 or not on_path
    x = torch.randn(m, k).bfloat16()
    tiled = repack_tiled(layer.qweight, bits, k)
    args = (layer.scales, layer.zero_points, layer.bias, bits, layer.effective_group_size, k)
    y = dequant_matmul(x, tiled, *args)
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.bfloat16])


def test_path_choice():
    """bf16 activations with fp16 scales and 2/3/4/8 bits take the packed path, any group (int8 with float
    zeros does not)."""
    for bits in (2, 3, 4, 8):
        assert dequant_gemv.packed(bits, torch.bfloat16, torch.float16, 32)
        assert dequant_gemv.packed(bits, torch.bfloat16, torch.float16, 32, float_zeros=True) == (bits != 8)
    assert not dequant_gemv.packed(4, torch.bfloat16, torch.float32, 128)
