"""The fp16x2 decode path (``kernels/dequant_f16x2.py``): fp16 activations and scales, 2/3/4/8 bits.

Under the interpreter the path runs its plain-Triton twin of the inline assembly (``ASM = False``).
Checked here: (1) that twin equals, bit for bit, an independent torch model of the PTX it stands for
(``mul.rn.f16x2`` / ``fma.rn.f16x2``: one rounding of the exact result); (2) the decode kernel on the
path vs the fp32 reference for every bit width, zero-point kind, group size and awkward shapes, and
that the launcher did take the path; (3) on a GPU, the inline assembly against the same torch model.
"""

import struct

import pytest
import torch
import triton
import triton.language as tl
from layer_helpers import make_layer
from llmq.kernels import dequant_gemv
from llmq.kernels.dequant_f16x2 import (
    ZERO_FLOAT,
    ZERO_INT,
    ZERO_NONE,
    dequant_field_f16,
    field_offset,
    fma_f16x2,
)
from llmq.kernels.dequant_matmul import dequant_matmul
from llmq.kernels.dequant_tile import TILE_WORDS, dequant_matmul_reference, repack_tiled

from llmq.quant.packing import codes_per_word

KINDS = {"none": ZERO_NONE.value, "int": ZERO_INT.value, "float": ZERO_FLOAT.value}


@triton.jit
def _field_kernel(w_ptr, s_ptr, z_ptr, x_ptr, out_ptr, acc_ptr, N, I: tl.constexpr, BITS: tl.constexpr,
                  ZERO_KIND: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_r = tl.arange(0, 16)
    offs_n = tl.arange(0, BLOCK_N)
    words = tl.load(w_ptr + offs_r[:, None] * N + offs_n[None, :])
    s = tl.load(s_ptr + offs_n)[None, :]
    z = tl.load(z_ptr + offs_n)[None, :]
    nzs = (-(z.to(tl.float32) * s.to(tl.float32))).to(tl.float16)
    w = dequant_field_f16(words, I, s, field_offset(z, I, BITS, ZERO_KIND), nzs, BITS, ZERO_KIND, ASM)
    tl.store(out_ptr + offs_r[:, None] * N + offs_n[None, :], w)
    x = tl.load(x_ptr + offs_r)[:, None]
    acc = tl.load(acc_ptr + offs_r[:, None] * N + offs_n[None, :])
    tl.store(acc_ptr + offs_r[:, None] * N + offs_n[None, :], fma_f16x2(w, x, acc, ASM))


def _torch_model(words, i, bits, s, z, kind, x, acc):
    """What the PTX computes: fp16 (code - zero)·scale rounded once (integer zeros), or fma(code, scale,
    -round16(zero·scale)) rounded once (float zeros); then fma(w, x, acc) rounded once."""
    codes = (words >> (i * bits)) & ((1 << bits) - 1)
    if kind == "float":
        nzs = (-(z.float() * s.float())).half()
        w = (codes.double() * s.double() + nzs.double()).half()
    else:
        zero = torch.full_like(s, 1 << (bits - 1), dtype=torch.float32) if kind == "none" else z.float()
        w = ((codes.float() - zero) * s.float()).half()
    return w, (w.double() * x[:, None].double() + acc.double()).half()


def _inputs(bits, kind, n=64):
    g = torch.Generator().manual_seed(bits * 10 + len(kind))
    words = torch.randint(-2**31, 2**31 - 1, (16, n), dtype=torch.int32, generator=g)
    s = (torch.rand(n, generator=g) * 0.1 + 1e-3).half()
    if kind == "float":
        z = (torch.rand(n, generator=g) * ((1 << bits) - 1)).half()
    else:
        z = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=g)
    x = (torch.randn(16, generator=g) * 3).half()
    acc = torch.randn(16, n, generator=g).half()
    return words, s, z, x, acc


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_interpreter_twin_is_bit_exact(bits, kind):
    """Every field: the ASM = False code gives the PTX model's bits (weights and fp16 accumulation)."""
    words, s, z, x, acc = _inputs(bits, kind)
    for i in range(32 // bits):
        w_out, acc_out = torch.empty(16, 64, dtype=torch.float16), acc.clone()
        _field_kernel[(1,)](words, s, z, x, w_out, acc_out, 64, I=i, BITS=bits, ZERO_KIND=KINDS[kind], ASM=False,
                            BLOCK_N=64)
        w_ref, acc_ref = _torch_model(words, i, bits, s, z, kind, x, acc)
        assert torch.equal(w_out.view(torch.int16), w_ref.view(torch.int16)), (bits, kind, i)
        assert torch.equal(acc_out.view(torch.int16), acc_ref.view(torch.int16)), (bits, kind, i)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_inline_asm_is_bit_exact_on_gpu(bits, kind):
    words, s, z, x, acc = (t.cuda() for t in _inputs(bits, kind))
    for i in range(32 // bits):
        w_out, acc_out = torch.empty(16, 64, dtype=torch.float16, device="cuda"), acc.clone()
        _field_kernel[(1,)](words, s, z, x, w_out, acc_out, 64, I=i, BITS=bits, ZERO_KIND=KINDS[kind], ASM=True,
                            BLOCK_N=64)
        w_ref, acc_ref = _torch_model(words.cpu(), i, bits, s.cpu(), z.cpu(), kind, x.cpu(), acc.cpu())
        assert torch.equal(w_out.cpu().view(torch.int16), w_ref.view(torch.int16)), (bits, kind, i)
        assert torch.equal(acc_out.cpu().view(torch.int16), acc_ref.view(torch.int16)), (bits, kind, i)


@pytest.mark.parametrize("k,n", [(300, 70), (256, 129), (520, 200), (512, 256)],
                         ids=["K300-N70", "K256-N129", "K520-N200", "K512-N256"])
@pytest.mark.parametrize("m", [1, 7, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("group", [64, 128, None], ids=lambda g: "perchannel" if g is None else f"g{g}")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_packed_decode_matches_reference(bits, kind, group, m, k, n, kernel_tol):
    layer = make_layer(k, n, bits, group, kind)
    assert layer.scales.dtype == torch.float16
    pl = dequant_gemv.plan(m, n, k, bits, layer.effective_group_size, layer.scales.shape[0], torch.float16,
                           layer.zero_points is not None, True, 1)
    assert pl.constexprs["PACKED"] and not pl.constexprs["ASM"]  # the interpreter twin of the fp16x2 path
    x = torch.randn(m, k).half()
    tiled = repack_tiled(layer.qweight, bits, k)
    args = (layer.scales, layer.zero_points, layer.bias, bits, layer.effective_group_size, k)
    y = dequant_matmul(x, tiled, *args)
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **kernel_tol[torch.float16])


@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"int{b}")
def test_packed_decode_group_32_and_split_k(bits, kernel_tol):
    """Groups of 32 features (two groups per 16-word tile for int4) with every split of K."""
    layer = make_layer(512, 64, bits, 32, "int")
    x = torch.randn(1, 512).half()
    tiled = repack_tiled(layer.qweight, bits, 512)
    args = (layer.scales, layer.zero_points, layer.bias, bits, 32, 512)
    ref = dequant_matmul_reference(x, layer.qweight, *args)
    for split in (1, 2, 512 // (TILE_WORDS * codes_per_word(bits))):
        torch.testing.assert_close(dequant_matmul(x, tiled, *args, split_k=split), ref, **kernel_tol[torch.float16])


def test_path_choice():
    """fp16x2 only for fp16 activations and scales, 2/3/4/8 bits, no group boundary inside a byte; int3 dots
    at M = 1 (its fields do not tile bytes)."""
    assert dequant_gemv.packed(4, torch.float16, torch.float16, 128)
    assert dequant_gemv.packed(2, torch.float16, torch.float16, 64)
    assert not dequant_gemv.packed(2, torch.float16, torch.float16, 32)
    assert dequant_gemv.packed(3, torch.float16, torch.float16, 128)
    assert dequant_gemv.plan(1, 256, 4096, 3, 128, 32, torch.float16, False, False, 132).constexprs["BLOCK_M"] == 16
    assert dequant_gemv.plan(1, 256, 4096, 4, 128, 32, torch.float16, False, False, 132).constexprs["BLOCK_M"] == 1
    assert not dequant_gemv.packed(4, torch.float32, torch.float16, 128)  # (bf16: test_dequant_bf16x2.py)
    assert not dequant_gemv.packed(4, torch.float16, torch.float32, 128)


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte j of the result is byte ``(sel >> 4j) & 7`` of ``b:a``."""
    src = (b << 32) | a
    return sum(((src >> (8 * ((sel >> (4 * j)) & 7))) & 0xFF) << (8 * j) for j in range(4))


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_asm_byte_selection_reads_every_field(bits):
    """The PRMT selector and LOP3 mask of each field's asm (``field_window``; int3's straddling fields read two
    bytes) put code·2^sh under the fp16 exponent of 1024 in both halves: checked by emulating the two integer
    ops in Python on random words (the asm itself only runs on a GPU)."""
    from llmq.kernels.dequant_f16x2 import _selector, field_window
    g = torch.Generator().manual_seed(bits)
    for w0, w1 in torch.randint(0, 2**32, (200, 2), generator=g, dtype=torch.int64).tolist():
        for i in range(32 // bits):
            byte, sh, two = field_window(bits, i)
            mask = ((1 << bits) - 1) << sh
            a = (_prmt(w0, w1, _selector(byte, two)) & (mask | mask << 16)) | 0x64006400
            for half, w in ((a & 0xFFFF, w0), (a >> 16, w1)):
                value = struct.unpack("<e", struct.pack("<H", half))[0]
                assert value == 1024 + ((w >> (i * bits)) & ((1 << bits) - 1)) * 2**sh, (bits, i)
