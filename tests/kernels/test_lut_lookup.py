"""The register-table lookup (``kernels/lut_lookup.py``): the generated PTX, its plain-Triton twin, the tables.

The interpreter cannot run inline assembly, and no GPU runs it here. So the PTX text of every quad of every
bit width is executed by a small model of the instructions it uses (``prmt`` default mode with sign
replication, ``and/or/shl/shr``, ``lop3``, ``mul/fma.rn.f16x2`` = one rounding of the exact result) and
checked, bit for bit, against (1) an independent torch model of the lookup (``codebook[code]`` times the
scale rounded once to fp16, times x plus acc rounded once) and (2) the twin (``quad_dot(ASM=False)``) run by
the interpreter on the same inputs.
"""

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from llmq.kernels.lut_lookup import load_tables, pack_f16x2, quad_dot, quad_fields, quad_ptx, table_regs


def _prmt(a, b, c):
    src = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for j in range(4):
        nib = (c >> (4 * j)) & 0xF
        byte = ((src >> ((nib & 7) * 8).astype(np.uint64)) & 0xFF).astype(np.uint32)
        byte = np.where(nib & 8, np.where(byte & 0x80, 0xFF, 0), byte).astype(np.uint32)
        out |= byte << (8 * j)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(32):
        ia, ib, ic = (a >> bit) & 1, (b >> bit) & 1, (c >> bit) & 1
        idx = (ia << 2) | (ib << 1) | ic  # immLut bit index for (a, b, c) = (0xF0, 0xCC, 0xAA)
        out |= (((lut >> idx) & 1).astype(np.uint32)) << bit
    return out


def _halves(v):
    lo = (v & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (v >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _pack(lo, hi):
    lo16 = lo.astype(np.float16).view(np.uint16).astype(np.uint32)  # float64 -> fp16: one rounding (RNE)
    hi16 = hi.astype(np.float16).view(np.uint16).astype(np.uint32)
    return lo16 | (hi16 << 16)


def run_ptx(text: str, operands: list[np.ndarray]) -> np.ndarray:
    """Execute the PTX subset the quad asm uses, elementwise over uint32 arrays; returns ``$0``."""
    regs = {f"${i}": v.astype(np.uint32) for i, v in enumerate(operands, start=1)}

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return np.full_like(operands[0], int(tok, 0), dtype=np.uint32)

    for stmt in re.findall(r"([a-z0-9.]+)\s+([^;{}]*);", text):
        op, args = stmt[0], [t.strip() for t in stmt[1].split(",")]
        if op.startswith(".reg"):
            continue
        d, src = args[0], [val(t) for t in args[1:]]
        if op == "prmt.b32":
            r = _prmt(*src)
        elif op == "lop3.b32":
            r = _lop3(src[0], src[1], src[2], int(args[4], 0))
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "or.b32":
            r = src[0] | src[1]
        elif op == "shl.b32":
            r = (src[0].astype(np.uint64) << int(args[2])).astype(np.uint32)
        elif op == "shr.u32":
            r = src[0] >> int(args[2])
        elif op == "mul.rn.f16x2":
            (a0, a1), (b0, b1) = _halves(src[0]), _halves(src[1])
            r = _pack(a0 * b0, a1 * b1)  # exact in float64 (11 + 11 bits), rounded once
        elif op == "fma.rn.f16x2":
            (a0, a1), (b0, b1), (c0, c1) = _halves(src[0]), _halves(src[1]), _halves(src[2])
            r = _pack(a0 * b0 + c0, a1 * b1 + c1)
        elif op == "mov.b32":
            r = src[0]
        else:
            raise AssertionError(f"PTX model has no {op}")
        regs[d] = r
    return regs["$0"]


def _tables(entries: np.ndarray, bits: int) -> list[np.ndarray]:
    """hi/lo byte registers of one table (``entries`` fp16, 2**bits), as load_tables builds them."""
    raw = entries.view(np.uint16).astype(np.uint32)
    hi, lo = [np.uint32(0)] * 4, [np.uint32(0)] * 4
    for e, v in enumerate(raw):
        hi[e // 4] |= np.uint32((v >> 8) << (8 * (e % 4)))
        lo[e // 4] |= np.uint32((v & 0xFF) << (8 * (e % 4)))
    r = table_regs(bits)
    return hi[:r] + lo[:r]


def _f16(n, rng, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(np.float16)


def _expected(words, entries, s, x, acc, bits, fields, first):
    """Independent model: w = round16(entry · s), acc = round16(w · x + acc) lane by lane."""
    mask = (1 << bits) - 1
    codes = [(words >> (bits * f)) & mask for f in fields]
    lanes = []
    for lane in (0, 1):
        a = np.zeros(len(words)) if first else acc[lane].astype(np.float64)
        for p in range(len(fields) // 2):
            f = 2 * p + lane
            w = (entries[codes[f]].astype(np.float64) * s[f].astype(np.float64)).astype(np.float16)
            a = (w.astype(np.float64) * x[f].astype(np.float64) + a).astype(np.float16).astype(np.float64)
        lanes.append(a)
    return _pack(*lanes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("first", [False, True])
def test_ptx_matches_the_lookup_model(bits, first):
    rng = np.random.default_rng(bits)
    n = 4096
    words = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    if bits == 3:
        words &= 0x3FFFFFFF  # 10 fields, bits 30-31 unused (packing.py)
    entries = _f16(1 << bits, rng)
    for q, fields in enumerate(quad_fields(bits)):
        s = [_f16(n, rng, 0.1) for _ in fields]
        x = [_f16(n, rng) for _ in fields]
        acc = [_f16(n, rng), _f16(n, rng)]
        pairs = []
        for p in range(len(fields) // 2):
            pairs += [_pack(s[2 * p].astype(np.float64), s[2 * p + 1].astype(np.float64)),
                      _pack(x[2 * p].astype(np.float64), x[2 * p + 1].astype(np.float64))]
        ops = [words, _pack(acc[0].astype(np.float64), acc[1].astype(np.float64)), *pairs]
        ops += [np.full(n, t, dtype=np.uint32) for t in _tables(entries, bits)]
        if bits == 4:
            ops.append((words.astype(np.uint64) << 4).astype(np.uint32))
        got = run_ptx(quad_ptx(bits, q, first), ops)
        want = _expected(words, entries, s, x, acc, bits, fields, first)
        assert np.array_equal(got, want), (bits, q, np.flatnonzero(got != want)[:5])


def test_quads_cover_every_field_once():
    for bits, p in ((1, 32), (2, 16), (3, 10), (4, 8)):
        seen = sorted(f for quad in quad_fields(bits) for f in quad)
        assert seen == list(range(p)), bits


@triton.jit
def _quad_kernel(w_ptr, cb_ptr, s_ptr, x_ptr, acc_ptr, out_ptr, BITS: tl.constexpr, Q: tl.constexpr,
                 FIRST: tl.constexpr, PER_COLUMN: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    offs_r = tl.arange(0, R)
    offs_n = tl.arange(0, C)
    idx = offs_r[:, None] * C + offs_n[None, :]
    words = tl.load(w_ptr + idx)
    if PER_COLUMN:
        tab = (offs_n * (1 << BITS))[None, :]
    else:
        tab = tl.zeros([1, 1], tl.int32)
    h0, h1, h2, h3, l0, l1, l2, l3 = load_tables(cb_ptr, tab, tab < (C << BITS), BITS)
    sA = pack_f16x2(tl.load(s_ptr + offs_n)[None, :], tl.load(s_ptr + C + offs_n)[None, :])
    sB = pack_f16x2(tl.load(s_ptr + 2 * C + offs_n)[None, :], tl.load(s_ptr + 3 * C + offs_n)[None, :])
    xA = pack_f16x2(tl.load(x_ptr + offs_r)[:, None], tl.load(x_ptr + R + offs_r)[:, None])
    xB = pack_f16x2(tl.load(x_ptr + 2 * R + offs_r)[:, None], tl.load(x_ptr + 3 * R + offs_r)[:, None])
    out = quad_dot(words, tl.load(acc_ptr + idx), sA, xA, sB, xB, h0, h1, h2, h3, l0, l1, l2, l3, BITS, Q, FIRST, False)
    tl.store(out_ptr + idx, out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("per_column", [False, True])
def test_twin_equals_the_ptx(bits, per_column):
    """The interpreter twin (ASM=False) gives the PTX model's bits, shared and per-column tables."""
    rng = np.random.default_rng(10 + bits)
    r, c = 16, 8
    words = rng.integers(0, 1 << 32, (r, c), dtype=np.uint64).astype(np.uint32)
    if bits == 3:
        words &= 0x3FFFFFFF
    cb = _f16((c if per_column else 1) * (1 << bits), rng).reshape(-1, 1 << bits)
    s = _f16(4 * c, rng, 0.1).reshape(4, c)
    x = _f16(4 * r, rng).reshape(4, r)
    acc = rng.integers(0, 1 << 32, (r, c), dtype=np.uint64).astype(np.uint32) & 0x3BFF3BFF  # finite fp16 pairs
    t = {k: torch.from_numpy(v.view(np.int32) if v.dtype == np.uint32 else v)
         for k, v in dict(words=words, cb=cb, s=s, x=x, acc=acc).items()}
    for q, fields in enumerate(quad_fields(bits)):
        for first in (False, True):
            out = torch.empty(r, c, dtype=torch.int32)
            _quad_kernel[(1,)](t["words"], t["cb"], t["s"], t["x"], t["acc"], out, bits, q, first, per_column, r, c)
            for n in range(c):
                row = cb[n if per_column else 0]
                ops = [words[:, n], acc[:, n]]
                for p in range(len(fields) // 2):
                    ops += [np.full(r, _pack(s[2 * p, n:n + 1].astype(np.float64), s[2 * p + 1, n:n + 1].astype(np.float64))[0]),
                            _pack(x[2 * p].astype(np.float64), x[2 * p + 1].astype(np.float64))]
                ops += [np.full(r, v, dtype=np.uint32) for v in _tables(row, bits)]
                if bits == 4:
                    ops.append((words[:, n].astype(np.uint64) << 4).astype(np.uint32))
                want = run_ptx(quad_ptx(bits, q, first), ops)
                got = out[:, n].numpy().view(np.uint32)
                assert np.array_equal(got, want), (bits, q, first, n)
