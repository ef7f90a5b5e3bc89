"""Decode-regime lookup-table matmul (M <= 16 rows): split-K GEMV over tiled codes and a codebook.

Same work split as ``dequant_gemv`` (grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``, split-K
partial sums atomically added in fp32, or stored to a workspace under deterministic algorithms, one
tile = ``[16, BLOCK_N]`` words whose field ``i`` holds 16 consecutive input features). Two paths:

* **packed** (fp16 activations, fp16 scales, M = 1): the codebook sits in registers as hi/lo byte
  tables (``lut_lookup.load_tables``, once per program) and every quad of four fields is looked up,
  scaled and accumulated in fp16x2 by one asm block (``lut_lookup.quad_dot``); the fp16 partial sums of
  ``TILES_PER_STEP`` tiles (about 16 products per half-register) are added to an fp32 accumulator.
  A field's scale row is loaded once per group (``group_of``: constexpr arithmetic, no division per
  iteration for the usual groups).
* **plain** (bf16 / fp32 activations, other scale dtypes, or M = 2..16): each field's codes index the
  codebook through an L1-cached gather (``tl.load(codebook + row + code)``), times the fp32 scale; FMAs
  into a ``[16, BLOCK_N]`` fp32 accumulator at M = 1, one tensor-core dot per field above.

Under ``TRITON_INTERPRET`` one config runs and the packed path runs its plain-Triton twin (``ASM=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmq.kernels._launch import autotune_bench, fp32_dot
from llmq.kernels.dequant_f16x2 import _x_field
from llmq.kernels.dequant_gemv import ATOMIC_ADD, OUT_ATOMIC_ADD, OUT_PARTIALS, OUT_STORE, STORE, _num_sms
from llmq.kernels.dequant_tile import TILE_WORDS
from llmq.kernels.interpreter import interpreting
from llmq.kernels.lut_lookup import check_lut_args, half_f16, FIELDS, NQUADS, load_tables, pack_f16x2, quad_dot
from llmq.quant.packing import codes_per_word

PACKED_BLOCK_N = 128  # M = 1 packed path: 8 rows x 2 columns of words per thread at 4 warps (see GPU_CONFIGS)
PLAIN_BLOCK_N = 64
# (num_warps, num_stages) per path; checked for spills on sm_90a under triton 3.6 and 3.9 (lut_cost)
GPU_CONFIGS = {"packed": [(4, 3)], "plain": [(4, 2), (4, 3)], "plain-dot": [(4, 3), (4, 4)]}
PROGRAMS_PER_SM = 4
STEP_PRODUCTS = 16  # fp16 products summed per half-register before the fp32 add (as dequant_f16x2)


@triton.jit
def group_of(t, f: tl.constexpr, P: tl.constexpr, GROUP_FIELDS: tl.constexpr, num_groups):
    """Group of field ``f`` of tile ``t`` (= feature ``(t·P + f)·16 // group_size``), clamped to the last
    group (padding features); constexpr arithmetic when the group divides the tile or the tile the group."""
    if P % GROUP_FIELDS == 0:
        g = t * (P // GROUP_FIELDS) + f // GROUP_FIELDS
    elif GROUP_FIELDS % P == 0:
        g = t // (GROUP_FIELDS // P)
    else:
        g = (t * P + f) // GROUP_FIELDS
    return tl.minimum(g, num_groups - 1)


@triton.jit
def _scale_row(s_ptr, g, offs_n, n_mask, N, EVEN_N: tl.constexpr):
    if EVEN_N:
        s = tl.load(s_ptr + g * N + offs_n)
    else:
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)
    return s[None, :]


@triton.jit
def lut_gemv_kernel(
    x_ptr, qw_ptr, cb_ptr, s_ptr, b_ptr, out_ptr,
    M, N, K, num_groups, tiles_per_split,
    stride_xm, stride_om, stride_os,
    BITS: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr, PER_COLUMN: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_MODE: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, GROUP_FIELDS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    TILES_PER_STEP: tl.constexpr, ASM: tl.constexpr,
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
    S: tl.constexpr = 1 << BITS
    MASK: tl.constexpr = S - 1
    if PACKED:  # M = 1, fp16: register tables, one asm block per quad of fields
        NQ: tl.constexpr = NQUADS[BITS]
        if PER_COLUMN:
            h0, h1, h2, h3, l0, l1, l2, l3 = load_tables(cb_ptr, (offs_n * S)[None, :], n_mask[None, :], BITS)
        else:  # one set of registers for every column
            z = tl.zeros([1, 1], tl.int32)
            h0, h1, h2, h3, l0, l1, l2, l3 = load_tables(cb_ptr, z, z == 0, BITS)
        xp = x_ptr + pid_m * stride_xm
        acc2 = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
        for t0 in range(t_start, t_end, TILES_PER_STEP):
            part = tl.zeros([TILE, BLOCK_N], dtype=tl.int32)  # ignored by the step's first quad (FIRST)
            for u in tl.static_range(TILES_PER_STEP):
                t = t0 + u
                w_ptrs = qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :]
                if EVEN_N:
                    words = tl.load(w_ptrs)
                else:
                    words = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
                for q in tl.static_range(NQ):
                    fa = FIELDS[BITS * 32 + q * 4 + 0]
                    fb = FIELDS[BITS * 32 + q * 4 + 1]
                    fc = FIELDS[BITS * 32 + q * 4 + 2]
                    fd = FIELDS[BITS * 32 + q * 4 + 3]
                    sA = pack_f16x2(_scale_row(s_ptr, group_of(t, fa, P, GROUP_FIELDS, num_groups), offs_n, n_mask, N, EVEN_N),
                                    _scale_row(s_ptr, group_of(t, fb, P, GROUP_FIELDS, num_groups), offs_n, n_mask, N, EVEN_N))
                    xA = pack_f16x2(_x_field(xp, t, fa, offs_r, K, P, TILE, EVEN_K),
                                    _x_field(xp, t, fb, offs_r, K, P, TILE, EVEN_K))
                    sB = sA
                    xB = xA
                    if fc >= 0:
                        sB = pack_f16x2(_scale_row(s_ptr, group_of(t, fc, P, GROUP_FIELDS, num_groups), offs_n, n_mask, N, EVEN_N),
                                        _scale_row(s_ptr, group_of(t, fd, P, GROUP_FIELDS, num_groups), offs_n, n_mask, N, EVEN_N))
                        xB = pack_f16x2(_x_field(xp, t, fc, offs_r, K, P, TILE, EVEN_K),
                                        _x_field(xp, t, fd, offs_r, K, P, TILE, EVEN_K))
                    part = quad_dot(words, part, sA, xA, sB, xB, h0, h1, h2, h3, l0, l1, l2, l3, BITS, q,
                                    u == 0 and q == 0, ASM)
            acc2 += half_f16(part, False).to(tl.float32) + half_f16(part, True).to(tl.float32)
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        if PER_COLUMN:
            cb_row = cb_ptr + (offs_n * S)[None, :]
        else:
            cb_row = cb_ptr + tl.zeros([1, BLOCK_N], tl.int32)
        if BLOCK_M == 1:
            acc2 = tl.zeros([TILE, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(t_start, t_end):
            words = tl.load(qw_ptr + (t * TILE + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            for f in tl.static_range(P):
                codes = (words >> (f * BITS)) & MASK
                entry = tl.load(cb_row + codes, mask=n_mask[None, :], other=0.0)  # L1 gather, [TILE, BLOCK_N]
                s = _scale_row(s_ptr, group_of(t, f, P, GROUP_FIELDS, num_groups), offs_n, n_mask, N, False)
                w = entry.to(tl.float32) * s.to(tl.float32)
                offs_k = (t * P + f) * TILE + offs_r
                if BLOCK_M == 1:
                    xv = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                    acc2 += xv[:, None] * w
                else:
                    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                                 mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                    if FP32_DOT:
                        acc = tl.dot(xt.to(tl.float32), w, acc, input_precision="tf32x3", out_dtype=tl.float32)
                    else:
                        acc = tl.dot(xt, w.to(xt.dtype), acc, out_dtype=tl.float32)
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=0)[None, :]

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if OUT_MODE != STORE:
            b = b * (pid_k == 0).to(tl.float32)  # one split adds the bias
        acc += b[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if OUT_MODE == ATOMIC_ADD:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def configs(path: str) -> list[triton.Config]:
    pairs = [(4, 1)] if interpreting() else GPU_CONFIGS[path]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]


_tuned = {path: triton.autotune(configs(path), key=["N", "K", "BITS", "PER_COLUMN"], reset_to_zero=["out_ptr"],
                                do_bench=autotune_bench)(lut_gemv_kernel) for path in GPU_CONFIGS}


@dataclass(frozen=True)
class LutGemvPlan:
    """How ``lut_gemv`` launches one problem (the cost report compiles from this)."""

    path: str
    grid: tuple[int, int, int]
    mode: int
    split: int
    tiles_per_split: int
    ints: dict
    constexprs: dict


def packed(act_dtype: torch.dtype, scale_dtype: torch.dtype, m: int) -> bool:
    """The register-table path: fp16 activations and scales, one row."""
    return m == 1 and act_dtype == torch.float16 and scale_dtype == torch.float16


def plan(m: int, n: int, k: int, bits: int, group_size: int, num_groups: int, per_column: bool,
         act_dtype: torch.dtype, has_bias: bool, num_sms: int, split_k: int = 0, deterministic: bool = False,
         stride_xm: int | None = None, scale_dtype: torch.dtype = torch.float16) -> LutGemvPlan:
    """The launch for ``x [m, k]`` and an ``n``-column weight on ``num_sms`` SMs. Pure: no tensors."""
    p = codes_per_word(bits)
    n_tiles = -(-k // (TILE_WORDS * p))
    is_packed = packed(act_dtype, scale_dtype, m)
    block_m = 1 if m == 1 else 16
    block_n = PACKED_BLOCK_N if is_packed else PLAIN_BLOCK_N
    n_blocks = -(-n // block_n)
    split = split_k or max(1, min(-(-PROGRAMS_PER_SM * num_sms // n_blocks), n_tiles // 2))
    tiles_per_split = -(-n_tiles // max(1, min(split, n_tiles)))
    step = 1
    if is_packed:  # tiles per fp16 partial sum: ~STEP_PRODUCTS products per half-register, dividing every split
        # (int3: one tile per step; two spilled 8 bytes of stack on sm_90a, per-field scale rows being live)
        want = max(1, STEP_PRODUCTS // (p // 2)) if bits != 3 else 1
        step = max(d for d in range(1, want + 1) if n_tiles % d == 0)
        tiles_per_split = -(-tiles_per_split // step) * step
    split = -(-n_tiles // tiles_per_split)
    mode = OUT_STORE if split == 1 else OUT_PARTIALS if deterministic else OUT_ATOMIC_ADD
    fp32 = fp32_dot(act_dtype)
    ints = dict(M=m, N=n, K=k, num_groups=num_groups, tiles_per_split=tiles_per_split,
                stride_xm=k if stride_xm is None else stride_xm, stride_om=n,
                stride_os=m * n if mode == OUT_PARTIALS else 0)
    constexprs = dict(BITS=bits, P=p, TILE=TILE_WORDS, PER_COLUMN=per_column, HAS_BIAS=has_bias, OUT_MODE=mode,
                      FP32_DOT=fp32, BLOCK_M=block_m, BLOCK_N=block_n, PACKED=is_packed,
                      GROUP_FIELDS=-(-group_size // TILE_WORDS), EVEN_K=k % (TILE_WORDS * p) == 0,
                      EVEN_N=n % block_n == 0, TILES_PER_STEP=step, ASM=not interpreting())
    path = "packed" if is_packed else "plain" if block_m == 1 else "plain-dot"
    return LutGemvPlan(path, (n_blocks, split, -(-m // block_m)), mode, split, tiles_per_split, ints, constexprs)


# x [M, K] fp16/bf16/fp32; qweight [tiled_rows(K, bits), N] int32 tiled; codebook [1 | N, 2**bits] fp16;
# scales [G, N] float; bias [N] or None; out [M, N] x.dtype
def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, split_k: int = 0) -> torch.Tensor:
    """``x @ W + bias`` for M <= 16 rows, ``W[k, n] = codebook[row(n), code] · scale`` (``lut_lookup``).

    Returns ``[M, N]`` in ``x.dtype`` (fp32 accumulation, one rounding at the end)."""
    check_lut_args(x, qweight, codebook, scales, bias, bits, group_size, in_features)
    m, k = x.shape
    n = qweight.shape[1]
    if m > 16:
        raise ValueError(f"lut_gemv runs M <= 16 rows, got M={m}: use lut_matmul")
    if x.stride(1) != 1:
        x = x.contiguous()
    pl = plan(m, n, k, bits, group_size, scales.shape[0], codebook.shape[0] != 1, x.dtype,
              bias is not None, _num_sms(x.device), split_k, torch.are_deterministic_algorithms_enabled(), x.stride(0),
              scales.dtype)
    if pl.mode == OUT_STORE:
        out = x.new_empty(1, m, n)
    elif pl.mode == OUT_PARTIALS:
        out = torch.empty(pl.split, m, n, device=x.device, dtype=torch.float32)
    else:
        out = torch.zeros(1, m, n, device=x.device, dtype=torch.float32)
    _tuned[pl.path][pl.grid](x, qweight, codebook, scales, bias if bias is not None else scales, out,
                             **pl.ints, **pl.constexprs)
    if pl.mode == OUT_PARTIALS:
        return out.sum(dim=0).to(x.dtype)
    return out[0].to(x.dtype)
