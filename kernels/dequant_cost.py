"""Cost-report cases of the weight kernels (``dequant_gemv``, ``dequant_gemm``, ``dequant_scratch``), built from the
launchers' own ``plan`` functions so the compiled constexprs and integer arguments are the launch's.

One case per autotune candidate; ``cost_cases.mark_picks`` marks the one the model ranks fastest.
"""

from __future__ import annotations

import torch

from llmq.kernels import dequant_gemm, dequant_gemv, dequant_scratch
from llmq.kernels.cost_cases import Case, Workload, register
from llmq.kernels.cost_model import matmul_fp16_us
from llmq.kernels.dequant_tile import TILE_WORDS
from llmq.kernels.sass import MockPointer
from llmq.quant.packing import codes_per_word

SMS = 132  # H100 / H200: the split-K rule and the grid depend on it


def mock_pointers(w: Workload, out_dtype: torch.dtype) -> dict:
    zeros = {"none": torch.float16, "int": torch.uint8, "float": torch.float16}[w.zeros]
    return dict(x_ptr=MockPointer(w.act_dtype), qw_ptr=MockPointer(torch.int32), s_ptr=MockPointer(torch.float16),
                z_ptr=MockPointer(zeros), b_ptr=MockPointer(torch.float16), out_ptr=MockPointer(out_dtype))


def _groups(w: Workload) -> int:
    return -(-w.k // w.group_size)


@register("dequant-gemv")
def gemv_cases(w: Workload):
    """The split-K decode kernel, M <= 16: every (warps, stages) of the path the launcher picks."""
    if w.m > 16:
        return
    pl = dequant_gemv.plan(w.m, w.n, w.k, w.bits, w.group_size, _groups(w), w.act_dtype, w.zeros != "none", w.bias,
                           SMS, float_zeros=w.zeros == "float")
    out_dtype = w.act_dtype if pl.mode == dequant_gemv.OUT_STORE else torch.float32
    args = {**mock_pointers(w, out_dtype), **pl.ints, **pl.constexprs}
    block_n = pl.constexprs["BLOCK_N"]
    dram = w.weight_bytes() + w.io_bytes()
    launches = 1
    if pl.mode == dequant_gemv.OUT_ATOMIC_ADD:  # zeroed fp32 buffer, atomics, then a cast to x.dtype
        dram += w.m * w.n * 4 * 3
        launches = 3
    grid = pl.grid[0] * pl.grid[1] * pl.grid[2]
    step = pl.constexprs["TILES_PER_STEP"] if pl.constexprs["PACKED"] and pl.constexprs["BLOCK_M"] == 1 else 1  # tiles per loop iteration
    for warps, stages in dequant_gemv.GPU_CONFIGS[pl.path]:
        yield Case("dequant-gemv", "gemv", f"{pl.path} split={pl.split} w{warps}s{stages}", w,
                   dequant_gemv.dequant_gemv_kernel, args, warps, stages, grid, pl.tiles_per_split // step,
                   step * TILE_WORDS * codes_per_word(w.bits) * block_n, dram, 2 * w.m * w.n * w.k, launches)


@register("dequant-gemm")
def gemm_cases(w: Workload):
    """The tiled tensor-core GEMM, every autotune tile (any M; the launcher runs it for M > 16)."""
    pl = dequant_gemm.plan(w.m, w.n, w.k, w.bits, w.group_size, _groups(w), w.act_dtype, w.zeros != "none", w.bias)
    p = pl.constexprs["P"]
    f = p if pl.path == "f16x2" else pl.constexprs["F"]  # fields per loop iteration (f16x2: the whole tile)
    n_tiles = -(-w.k // (TILE_WORDS * p))
    for bm, bn, warps, stages in dequant_gemm.CONFIGS[pl.path]:
        args = {**mock_pointers(w, w.act_dtype), **pl.ints, **pl.constexprs, "BLOCK_M": bm, "BLOCK_N": bn}
        grid = -(-w.m // bm) * -(-w.n // bn)
        yield Case("dequant-gemm", "gemm", f"{pl.path} {bm}x{bn} w{warps}s{stages}", w, dequant_gemm.KERNELS[pl.path],
                   args, warps, stages, grid, n_tiles * (p // f), TILE_WORDS * f * bn,
                   w.weight_bytes() + w.io_bytes(), 2 * w.m * w.n * w.k)


@register("dequant-scratch")
def scratch_cases(w: Workload):
    """Prefill by dequantize-to-scratch + cuBLAS: the Triton dequantization compiled, the fp16 matmul
    after it modelled (``cost_model.matmul_fp16_us``, in ``extra_us``). Every M (meant for large M)."""
    grid, ints, constexprs = dequant_scratch.plan(w.n, w.k, w.bits, w.group_size, _groups(w), w.act_dtype,
                                                  w.zeros != "none")
    args = {"qw_ptr": MockPointer(torch.int32), "s_ptr": MockPointer(torch.float16),
            "z_ptr": mock_pointers(w, w.act_dtype)["z_ptr"], "w_ptr": MockPointer(w.act_dtype), **ints, **constexprs}
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[w.act]
    yield Case("dequant-scratch", "scratch+cublas", f"w{dequant_scratch.NUM_WARPS}", w,
               dequant_scratch.dequant_scratch_kernel, args, dequant_scratch.NUM_WARPS, 1, grid[0] * grid[1], 1,
               TILE_WORDS * constexprs["P"] * constexprs["BLOCK_N"], w.weight_bytes() + w.k * w.n * size,
               2 * w.m * w.n * w.k, 1, extra_us=lambda device: matmul_fp16_us(w.m, w.n, w.k, device),
               extra_note="cuBLAS fp16 matmul on the dequantized weight (modelled)")
