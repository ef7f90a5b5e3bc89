"""Decode-regime fused dequantize-matmul (M <= 16 rows): split-K GEMV.

At decode sizes the matmul is bound by reading the packed weight once; the work is spread so that
every SM streams weight words even at M = 1:

* grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: ``N / BLOCK_N`` column blocks alone are
  too few to keep every SM's memory pipe full (4096 / 64 = 64 programs for 132 SMs on an H100),
  so K is split into ``SPLIT_K`` contiguous ranges of tiles (chosen so that ~4 programs run per SM),
  each partial sum ``atomic_add``-ed into an fp32 output. ``SPLIT_K = 1`` stores directly in the
  activation dtype. Under ``torch.use_deterministic_algorithms(True)`` the partial sums are stored
  to a ``[SPLIT_K, M, N]`` fp32 workspace instead and summed by torch in a fixed order, so results are
  bitwise reproducible (atomics add in arrival order; the low bits of the fp32 sum vary run to run).
* the weight block of one tile, ``[TILE_WORDS, BLOCK_N]`` int32, is one coalesced load with
  ``BLOCK_N`` contiguous words (two 128-byte lines) per row; fields are unpacked in
  registers by shift + mask, and turned into floats without an int->float conversion
  (``dequant_tile.codes_minus_zero``) — each word is read from memory once.
* per field, the scale (and zero) row is one ``[BLOCK_N]`` load (tiled layout: a field never
  straddles a group), reused from L1 by the other fields of the same group.
* M = 1 (``BLOCK_M = 1``): CUDA-core FMAs into a ``[TILE_WORDS, BLOCK_N]`` fp32 accumulator, reduced
  once at the end (no per-step cross-thread reduction, no wasted tensor-core rows).
  2 <= M <= 16 (``BLOCK_M = 16``): one ``tl.dot`` per two fields (K = 32; int3 and fp32
  activations one per field, K = 16) with fp32 accumulation.

Under ``TRITON_INTERPRET`` a single config runs; on CUDA ``@triton.autotune`` picks warps/stages
per (N, K, BITS), separately for the FMA and dot paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmq.kernels._launch import autotune_bench, check_args, fp32_dot
from llmq.kernels.interpreter import interpreting
from llmq.kernels.dequant_bf16x2 import decode_tiles_bf16x2, supports as supports_bf16
from llmq.kernels.dequant_f16x2 import (ZERO_FLOAT, ZERO_INT, ZERO_NONE, decode_tiles_f16x2, supports,  # noqa: F401
                                        supports_byte_loop)
from llmq.kernels.dequant_tile import (TILE_WORDS, accumulate_dot, dequant_field,  # noqa: F401
                                       dequant_fields, dequant_matmul_reference, fields_per_dot)
from llmq.quant.packing import codes_per_word

# Output columns per program: a [16, 64] int32 tile is 8 words (two 16-byte loads) per thread at 4 warps.
# With 32 columns and 8 warps (the first version) each thread loaded 2 words per tile; an H200 then
# streamed the weight at ~13% of its bandwidth. 128 columns spill registers at 4 warps for int2.
DECODE_BLOCK_N = 64
PACKED_BLOCK_N = 256  # M = 1 on the fp16x2 path: 8 rows x 4 columns of words per thread at 4 warps
PACKED_DOT_BLOCK_N = 128  # M = 2..16: 16 codes per thread per field at 4 warps (3.35 instr/code; 64 columns: 6.2)
# (num_warps, num_stages) tried on CUDA, per path. Chosen so that no config spills registers on sm_80 or
# sm_90a, under triton 3.6 and 3.9, for any bit width (tests/kernels/test_aot_weight_kernels.py); deep
# pipelines keep several weight tiles in flight per program. The exceptions each avoid a small stack
# frame seen on sm_90a: int8's FMA path and the fp16/bf16 dot path run 8 warps (4 warps: 16 bytes under
# triton 3.9 / 8 bytes for int2 under 3.6) and, like the fp32 dot path, skip 2 stages (8 bytes); bf16 int3
# (packed-dot-int3) runs 4 stages only (3: 8 bytes on sm_90a under 3.6), fp16 int3 3 stages only (4: 8 bytes on
# sm_80 with integer zeros under 3.9).
GPU_CONFIGS = {"fma": [(4, 2), (4, 3), (4, 4)], "packed": [(8, 3)], "packed-dot": [(4, 3), (4, 4)],
               "packed-dot-int3": [(4, 4)], "packed-dot-f16-int3": [(4, 3)], "fma-int8": [(8, 2), (8, 3), (8, 4)],
               "dot": [(8, 3), (8, 4)], "dot-fp32": [(4, 3), (4, 4)]}
INTERPRETER_CONFIGS = [(4, 1)]
PROGRAMS_PER_SM = 4  # split-K target: enough programs in flight to cover DRAM latency
# how a program writes its result (OUT_MODE): one split stores in the activation dtype; several
# splits atomic_add into fp32, or (deterministic algorithms) store fp32 partials summed afterwards
# (plain ints for the launcher — comparing tl.constexpr objects costs microseconds per call — and
# constexpr copies for the kernel, which can read module-level globals only when they are constexprs)
OUT_STORE, OUT_ATOMIC_ADD, OUT_PARTIALS = 0, 1, 2
STORE: tl.constexpr = tl.constexpr(OUT_STORE)
ATOMIC_ADD: tl.constexpr = tl.constexpr(OUT_ATOMIC_ADD)
PARTIALS: tl.constexpr = tl.constexpr(OUT_PARTIALS)


def configs(path: str) -> list[triton.Config]:
    pairs = INTERPRETER_CONFIGS if interpreting() else GPU_CONFIGS[path]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]


@triton.jit
def dequant_gemv_kernel(
    # pointers
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    # sizes
    M, N, K, group_size, num_groups, tiles_per_split,
    # strides (rows of x / out; qweight, scales, qzeros are contiguous [rows, N])
    stride_xm, stride_om, stride_os,
    # meta
    BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr, FP32_DOT: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr = False, GROUP_FIELDS: tl.constexpr = 1, EVEN_K: tl.constexpr = False,
    EVEN_N: tl.constexpr = False, TILES_PER_STEP: tl.constexpr = 1, ASM: tl.constexpr = True,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, TILE)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, TILE * P))

    if PACKED:  # fp16 scales, fp16 / bf16 activations, 2/4/8-bit codes: dequant_f16x2 / dequant_bf16x2
        if not HAS_ZEROS:
            ZERO_KIND: tl.constexpr = ZERO_NONE
        elif z_ptr.dtype.element_ty == tl.uint8:
            ZERO_KIND: tl.constexpr = ZERO_INT
        else:
            ZERO_KIND: tl.constexpr = ZERO_FLOAT
    if PACKED and x_ptr.dtype.element_ty == tl.bfloat16:
        acc = decode_tiles_bf16x2(x_ptr + pid_m * BLOCK_M * stride_xm, qw_ptr, s_ptr, z_ptr, m_mask, offs_n, n_mask,
                                  t_start, t_end, N, K, num_groups, stride_xm, BITS, P, TILE, GROUP_FIELDS, ZERO_KIND,
                                  BLOCK_M, BLOCK_N, ASM)
    elif PACKED:
        acc = decode_tiles_f16x2(x_ptr + pid_m * BLOCK_M * stride_xm, qw_ptr, s_ptr, z_ptr, m_mask, offs_n, n_mask, t_start, t_end, N, K,
                                 num_groups, stride_xm, BITS, P, TILE, GROUP_FIELDS, ZERO_KIND, BLOCK_M, BLOCK_N, EVEN_K,
                                 EVEN_N, TILES_PER_STEP, ASM)
    else:
        if BLOCK_M == 1:
            acc2 = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(t_start, t_end):
            words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0)  # [TILE, BLOCK_N] int32
            if BLOCK_M == 1:
                for i in tl.static_range(P):
                    k0 = t * (TILE * P) + i * TILE
                    w = dequant_field(words, i, s_ptr, z_ptr, offs_n, n_mask, k0, N, group_size, num_groups,
                                      BITS, HAS_ZEROS)  # [TILE, BLOCK_N] fp32
                    offs_k = k0 + offs_r
                    xv = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                    acc2 += xv[:, None] * w
            elif F > 1:  # P / F dots with K = F * TILE
                for c in tl.static_range(P // F):
                    w = dequant_fields(words, t, c * F, s_ptr, z_ptr, offs_n, n_mask, N, group_size, num_groups,
                                       BITS, P, F, TILE, HAS_ZEROS)  # [F * TILE, BLOCK_N] fp32
                    offs_k = t * (TILE * P) + c * (F * TILE) + tl.arange(0, F * TILE)
                    acc = accumulate_dot(acc, x_ptr, offs_m, m_mask, stride_xm, offs_k, K, w, FP32_DOT)
            else:  # int3: field by field, K = 16 per dot
                for i in tl.static_range(P):
                    k0 = t * (TILE * P) + i * TILE
                    w = dequant_field(words, i, s_ptr, z_ptr, offs_n, n_mask, k0, N, group_size, num_groups,
                                      BITS, HAS_ZEROS)  # [TILE, BLOCK_N] fp32
                    offs_k = k0 + offs_r
                    acc = accumulate_dot(acc, x_ptr, offs_m, m_mask, stride_xm, offs_k, K, w, FP32_DOT)
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=0)[None, :]  # [1, BLOCK_N]

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if OUT_MODE != STORE:
            b = b * (pid_k == 0).to(tl.float32)  # one split adds the bias
        acc += b[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if OUT_MODE == ATOMIC_ADD:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:  # STORE (x dtype, one split) or PARTIALS (fp32, this split's slice of the workspace)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_KEY = ["N", "K", "BITS", "HAS_ZEROS"]
# the FMA path (BLOCK_M = 1), the bf16/fp16 dot path and the fp32 (tf32x3) dot path tune separately:
# their register budgets differ
_tuned = {path: triton.autotune(configs(path), key=_KEY, reset_to_zero=["out_ptr"],
                                do_bench=autotune_bench)(dequant_gemv_kernel)
          for path in GPU_CONFIGS}


def decode_path(block_m: int, bits: int, dtype: torch.dtype, is_packed: bool = False) -> str:
    """Which autotuned variant runs: for one row the fp16x2 path (``packed``) or FMA (its own configs at 8
    bits); tensor-core dots for 2-16 rows."""
    if block_m == 1:
        return "packed" if is_packed else "fma-int8" if bits == 8 else "fma"
    if is_packed:  # bf16 int3 at 3 stages spills 8 bytes on sm_90a under triton 3.6 (not under 3.9); fp16 int3 alike
        if bits == 3:  # fp16 int3 at 4 stages: 8 bytes of stack on sm_80 (integer zeros) under triton 3.9
            return "packed-dot-int3" if dtype == torch.bfloat16 else "packed-dot-f16-int3"
        return "packed-dot"
    return "dot-fp32" if fp32_dot(dtype) else "dot"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_split_k(n: int, k: int, bits: int, num_sms: int, block_n: int) -> int:
    """Splits of K so ~PROGRAMS_PER_SM programs per SM run, keeping >= 2 tiles per split."""
    n_tiles = -(-k // (TILE_WORDS * codes_per_word(bits)))
    n_blocks = -(-n // block_n)
    want = -(-PROGRAMS_PER_SM * num_sms // n_blocks)
    return max(1, min(want, n_tiles // 2))


@dataclass(frozen=True)
class GemvPlan:
    """How ``dequant_gemv_launch`` launches for one problem: the autotuned variant, the grid, the output
    mode and every integer / constexpr kernel argument by name (the cost report compiles from this)."""

    path: str
    grid: tuple[int, int, int]
    mode: int  # OUT_STORE / OUT_ATOMIC_ADD / OUT_PARTIALS
    split: int
    tiles_per_split: int
    ints: dict
    constexprs: dict


def packed(bits: int, act_dtype: torch.dtype, scale_dtype: torch.dtype, group_size: int, m: int = 1,
           float_zeros: bool = False) -> bool:
    """Whether the packed dequantization runs: fp16 scales, and fp16 activations with 2/3/4/8-bit codes
    (``dequant_f16x2``; int3's two byte-straddling fields read a two-byte window and int3 dots at M = 1; not
    int2 with 32-feature groups, which put a group boundary inside a byte, nor int2 with float zeros at
    M > 1, whose dot configs spill 8 bytes on sm_90a) or bf16 activations with 2/3/4/8-bit codes
    (``dequant_bf16x2``, any group: it dequantizes field by field; not int8 with float zeros).
    Otherwise (fp32 activations, other scale dtypes) the fp32 dequantization runs."""
    if scale_dtype != torch.float16:
        return False
    if act_dtype == torch.bfloat16:  # int8 float zeros: an 8-byte stack frame on sm_90a under triton 3.6
        return supports_bf16(bits) and not (bits == 8 and float_zeros)
    return (act_dtype == torch.float16 and supports(bits) and not (bits == 2 and group_size < 64)
            and not (bits == 2 and float_zeros and m > 1))


def plan(m: int, n: int, k: int, bits: int, group_size: int, num_groups: int, act_dtype: torch.dtype,
         has_zeros: bool, has_bias: bool, num_sms: int, split_k: int = 0, deterministic: bool = False,
         stride_xm: int | None = None, scale_dtype: torch.dtype = torch.float16, float_zeros: bool = False) -> GemvPlan:
    """The launch of ``dequant_gemv_launch`` for ``x [m, k]`` (row stride ``stride_xm``, default k) and an
    ``n``-column weight on a GPU with ``num_sms`` SMs. Pure: no tensors, no device."""
    p = codes_per_word(bits)
    n_tiles = -(-k // (TILE_WORDS * p))
    is_packed = packed(bits, act_dtype, scale_dtype, group_size, m, float_zeros)
    # tensor-core dots at M = 1 too: bf16 (dequant_bf16x2) and fp16 int3 (fields do not tile bytes)
    dots_at_1 = is_packed and (act_dtype == torch.bfloat16 or not supports_byte_loop(bits))
    block_m = 1 if m == 1 and not dots_at_1 else 16
    block_n = (PACKED_BLOCK_N if block_m == 1 else PACKED_DOT_BLOCK_N) if is_packed else DECODE_BLOCK_N
    split = split_k or auto_split_k(n, k, bits, num_sms, block_n)
    tiles_per_split = -(-n_tiles // max(1, min(split, n_tiles)))
    if is_packed and block_m == 1 and n_tiles % 2 == 0 and tiles_per_split % 2:
        tiles_per_split += 1  # even tile counts in every split: two tiles per fp16 partial sum (TILES_PER_STEP)
    split = -(-n_tiles // tiles_per_split)  # no empty splits
    mode = OUT_STORE if split == 1 else OUT_PARTIALS if deterministic else OUT_ATOMIC_ADD
    fp32 = fp32_dot(act_dtype)
    ints = dict(M=m, N=n, K=k, group_size=group_size, num_groups=num_groups, tiles_per_split=tiles_per_split,
                stride_xm=k if stride_xm is None else stride_xm, stride_om=n,
                stride_os=m * n if mode == OUT_PARTIALS else 0)
    constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, OUT_MODE=mode,
                      FP32_DOT=fp32, F=fields_per_dot(bits, fp32), BLOCK_M=block_m, BLOCK_N=block_n,
                      # one group (per channel): a multiple of P, so the rows load once per tile
                      PACKED=is_packed, GROUP_FIELDS=n_tiles * p if num_groups == 1 else -(-group_size // TILE_WORDS),
                      EVEN_K=k % (TILE_WORDS * p) == 0, EVEN_N=n % block_n == 0,
                      TILES_PER_STEP=2 if tiles_per_split % 2 == 0 and n_tiles % 2 == 0 else 1, ASM=not interpreting())
    grid = (-(-n // block_n), split, -(-m // block_m))
    return GemvPlan(decode_path(block_m, bits, act_dtype, constexprs["PACKED"]), grid, mode, split, tiles_per_split, ints, constexprs)


# x        [M, K]        fp16 | bf16 | fp32, rows contiguous along K
# qweight  [R, N]        int32, tiled layout (kernels.dequant_tile), R = tiled_rows(K, bits)
# scales   [G, N]        float (any float dtype), G = ceil(K / group_size)
# qzeros   [G, N]        uint8 (integer zeros) or float (float zeros), or None (symmetric: 2**(bits-1))
# bias     [N]           float, or None
# out      [M, N]        x.dtype
def dequant_gemv_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 split_k: int = 0) -> torch.Tensor:
    """``x @ dequant(W) + bias`` for M <= 16 rows, from tiled packed words.

    Args:
        x: ``[M, K]`` activations, fp16/bf16/fp32, last dim contiguous.
        qweight: ``[tiled_rows(K, bits), N]`` int32, ``kernels.dequant_tile`` tiled layout.
        scales: ``[G, N]`` float group scales; ``qzeros``: ``[G, N]`` uint8 integer or float zero points, or ``None`` (symmetric).
        bias: ``[N]`` or ``None``.
        bits: 2, 3, 4 or 8. group_size: effective group length (K for per-channel).
        in_features: K. split_k: K splits (0 = automatic: fill the SMs).

    Returns ``[M, N]`` in ``x.dtype`` (fp32 accumulation; one rounding at the end).
    """
    check_args(x, qweight, scales, qzeros, bias, bits, group_size, in_features)
    m, k = x.shape
    n = qweight.shape[1]
    if m > 16:
        raise ValueError(f"dequant_gemv runs M <= 16 rows, got M={m}: use dequant_gemm")
    if split_k < 0:
        raise ValueError(f"split_k must be >= 0 (0 = automatic), got {split_k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    pl = plan(m, n, k, bits, group_size, scales.shape[0], x.dtype, qzeros is not None, bias is not None,
              _num_sms(x.device), split_k, torch.are_deterministic_algorithms_enabled(), x.stride(0), scales.dtype,
              qzeros is not None and qzeros.is_floating_point())
    mode = pl.mode
    if mode == OUT_STORE:
        out = x.new_empty(1, m, n)
    elif mode == OUT_PARTIALS:
        out = torch.empty(pl.split, m, n, device=x.device, dtype=torch.float32)
    else:
        out = torch.zeros(1, m, n, device=x.device, dtype=torch.float32)
    _tuned[pl.path][pl.grid](
        x, qweight, scales, qzeros if qzeros is not None else scales, bias if bias is not None else scales, out,
        **pl.ints, **pl.constexprs)
    if mode == OUT_PARTIALS:
        return out.sum(dim=0).to(x.dtype)  # fixed-order reduction over the splits
    return out[0].to(x.dtype)


# the same launcher as a torch.library op (torch.compile, CUDA graphs); _launch.through_op says when
dequant_gemv = torch.library.custom_op("llmq::dequant_gemv", dequant_gemv_launch, mutates_args=())


@dequant_gemv.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features, split_k=0):
    return x.new_empty(x.shape[0], qweight.shape[1])
