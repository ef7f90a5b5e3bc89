"""The cpu backend's large-M path (dequantize to bf16 in chunks + bf16 GEMM) against the exact product,
within the bound ``llmq.nn.cpu_backend`` documents; which path runs at which M."""

import pytest
import torch

from llmq.nn import cpu_dequant
from llmq.nn.cpu_layout import to_cpu
from llmq.quant.packing import pack
from test_cpu_backend import _check, _layer

AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
needs_block64 = pytest.mark.skipif(not AVX512, reason="the int4 unpack reads the AVX-512 block-64 pack; "
                                   "other CPUs run the kernel at every M")
# (bits, group): int4 grouped / longer than the kernel group / per channel, 2/3-bit, int8 per channel, split 8-bit
SCHEMES = [(4, 128), (4, 32), (4, None), (3, 64), (2, 128), (8, None), (8, 64)]
# N: one and two 64-row blocks, and past one chunk with a partial last chunk
NS = [64, 128, cpu_dequant.CHUNK_N + 64]


@needs_block64
def test_block64_unpack_is_the_pack_inverse():
    assert cpu_dequant.block64_layout()
    codes = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    held = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(cpu_dequant._unpack_t(held), codes.t().to(torch.uint8))
    # and the cpu layout of llmq's canonical words is exactly that pack (4-bit codes are held as they are)
    canonical = pack(codes.t().to(torch.uint8), 4)
    assert torch.equal(to_cpu(canonical, 4, 96), held)


@needs_block64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", NS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group", SCHEMES, ids=[f"int{b}-g{g or 'chan'}" for b, g in SCHEMES])
def test_large_m_within_documented_bound(bits, group, sym, n, dtype, monkeypatch):
    calls = []
    for name in ("int4_pack_matmul", "int8_matmul"):
        real = getattr(cpu_dequant, name)
        monkeypatch.setattr(cpu_dequant, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    k = 200  # not a multiple of 32 or of the groups: padded K, a short last group
    layer, qw, b = _layer(k, n, bits, group, sym)
    m = cpu_dequant.INT8_MIN_M if bits == 8 and group is None else cpu_dequant.INT4_MIN_M
    for rows in (m, m + 65):
        _check(layer, qw, b, rows, k, dtype)
    assert len(calls) == 2 and set(calls) == {"int8_matmul" if bits == 8 and group is None else "int4_pack_matmul"}


@pytest.mark.parametrize("bits,group", [(4, 128), (8, None), (8, 64)], ids=["int4", "int8", "int8-split"])
def test_small_m_runs_the_kernel(bits, group, monkeypatch):
    """Below the crossover the kernels run (the decode path is unchanged)."""
    def refuse(*a):
        raise AssertionError("dequantize path taken below the crossover")

    monkeypatch.setattr(cpu_dequant, "int4_pack_matmul", refuse)
    monkeypatch.setattr(cpu_dequant, "int8_matmul", refuse)
    layer, qw, b = _layer(128, 64, bits, group, False)
    m = (cpu_dequant.INT8_MIN_M if bits == 8 and group is None else cpu_dequant.INT4_MIN_M) - 1
    for rows in (1, m):
        _check(layer, qw, b, rows, 128, torch.float32)


def test_n_off_the_64_row_block_keeps_the_kernel(monkeypatch):
    """N = 48 (a multiple of 16, so the kernel runs) cannot be unpacked by 64-row blocks: kernel at every M."""
    monkeypatch.setattr(cpu_dequant, "int4_pack_matmul", lambda *a: pytest.fail("dequantize path taken"))
    layer, qw, b = _layer(128, 48, 4, 32, True)
    _check(layer, qw, b, cpu_dequant.INT4_MIN_M + 10, 128, torch.float32)
