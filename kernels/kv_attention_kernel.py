"""The Triton kernels of the quantized-KV decode attention (launcher, reference and layout: ``kv_attention``).

    grid = (B * H_kv, n_splits)           program (b, kv head, split)
      ┌ tokens [split*S, (split+1)*S) ──────────────────────────────────────┐
      │ quantized part, BLOCK_W tile rows at a time (BLOCK_W * P / J tokens):│
      │   tile row i = word row w0 + i // J shifted by (i % J) fields, J =   │
      │   ROW_FIELDS (each word row loaded J times: DRAM once, then L1);     │
      │   load the [BLOCK_W, D] K and V words once per step; tile field f    │
      │   holds the tokens w*P + i%J + f*J; FIELDS_PER_STEP tile fields are  │
      │   one online-softmax step                                            │
      │   (max over all their scores, one reduction; Σp per column, reduced  │
      │   once after the loop); for each field:                              │
      │     K: per-channel keys  (q∘s_g) · codes_fᵀ - (q∘s_g) · z_g, g = key │
      │        group; per-token keys (q_j · codes_fᵀ - Σq_j · z_j) * s_j     │
      │     V: (p * s_j) · codes_f - Σ_t p s_j z_j, j = channel group        │
      │ residual part: load fp [BLOCK_N, D] tiles                            │
      │ online softmax for all n_rep query heads of this kv head             │
      └──▶ partial (acc [n_rep, D], max m, sum l) in fp32 ───────────────────┘
    reduce grid = (B * H_q,): out = Σ e^(m_s-M) acc_s / Σ e^(m_s-M) l_s
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmq.kernels.dequant_tile import codes_minus_zero

@triton.jit
def _field_codes(words, f, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Field ``f`` (bits ``f*BITS`` up) of each word of a ``[BLOCK_W, D]`` block as exact ``DOT_DTYPE`` codes.

    No int->float conversion: fp16 gets the code in the mantissa of 1024 (``0x6400 | code``, exact for codes
    < 1024) minus 1024, other dtypes the fp32 form of ``kernels.dequant_tile.codes_minus_zero``.
    """
    c = (words >> (f * BITS)) & ((1 << BITS) - 1)  # arithmetic shift: the mask drops the sign bits
    if DOT_DTYPE == tl.float16:
        return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        return codes_minus_zero(c, 0.0).to(DOT_DTYPE)


@triton.jit
def _channel_folded_q(q_f32, S, Z, row_off, first_token, q_end, offs_d, BITS: tl.constexpr,
                      SYMMETRIC: tl.constexpr):
    """Per-channel keys of one token group: ``q · ((c - z) · s)ᵀ = (q∘s) · cᵀ - (q∘s) · z``.

    Returns ``q∘s`` ``[BLOCK_H, D]`` fp32 and ``(q∘s) · z`` ``[BLOCK_H]`` for the scale/zero row at ``row_off``
    (zeros for a group starting at or past ``q_end``: its row may not exist).
    """
    row_ok = (offs_d * 0 + first_token) < q_end  # a [D] mask: the interpreter rejects a scalar mask here
    sc = tl.load(S + row_off + offs_d, mask=row_ok, other=0.0).to(tl.float32)
    q_g = q_f32 * sc[None, :]
    if SYMMETRIC:
        qz = tl.sum(q_g, 1) * (1 << (BITS - 1))
    else:
        qz = tl.sum(q_g * tl.load(Z + row_off + offs_d, mask=row_ok, other=0).to(tl.float32)[None, :], 1)
    return q_g, qz


@triton.jit
def _token_params(S, Z, tok, valid, j, stride_st, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scale and zero ``[BLOCK_W]`` fp32 of channel group ``j`` for tokens ``tok`` (per-token groups)."""
    sc = tl.load(S + tok * stride_st + j, mask=valid, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.full(sc.shape, 1 << (BITS - 1), tl.float32)
    else:
        z = tl.load(Z + tok * stride_st + j, mask=valid, other=0).to(tl.float32)
    return sc, z


@triton.jit
def _field_scores(q_f32, k_words, f, w0, rows, tok, valid, q_end, KS, KZ, stride_kst, sm_scale, offs_d,
                  BITS: tl.constexpr, GROUP: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr, SYMMETRIC: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_H: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  ROW_FIELDS: tl.constexpr):
    """Scaled scores ``[BLOCK_H, BLOCK_W]`` fp32 of the tokens ``tok = rows*P + f`` (field ``f`` of the words
    ``[BLOCK_W, D]``), ``-inf`` where not ``valid``.

    Scores come from the exact codes; scales and zeros act on q (per-channel keys: ``(q∘s)·cᵀ - (q∘s)·z``)
    or on the scores (per-token keys: ``(q_j·cᵀ - Σq_j·z_j)·s_j``), never on a ``[BLOCK_W, D]`` tile.
    """
    P: tl.constexpr = 32 // BITS
    N_GROUPS: tl.constexpr = HEAD_DIM // GROUP  # channel groups of per-token scales
    G_T: tl.constexpr = max(1, (BLOCK_W // ROW_FIELDS) * P // GROUP)  # token groups of per-channel keys in a block
    k_codes = tl.trans(_field_codes(k_words, f, BITS, DOT_DTYPE))  # [D, BLOCK_W]
    s = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    if KEY_PER_CHANNEL:  # a word row's P tokens share one key group (P divides GROUP)
        for gr in tl.static_range(G_T):
            g = (w0 * P) // GROUP + gr
            q_g, qz = _channel_folded_q(q_f32, KS, KZ, g * stride_kst, g * GROUP, q_end, offs_d, BITS, SYMMETRIC)
            part = tl.dot(q_g.to(DOT_DTYPE), k_codes) - qz[:, None]
            if G_T == 1:
                s += part
            else:
                s += tl.where((((rows - w0) * P) // GROUP == gr)[None, :], part, 0.0)
    else:
        d_group = offs_d // GROUP
        for j in tl.static_range(N_GROUPS):
            q_j = tl.where((d_group == j)[None, :], q_f32, 0.0)
            sc, z = _token_params(KS, KZ, tok, valid, j, stride_kst, BITS, SYMMETRIC)
            s += (tl.dot(q_j.to(DOT_DTYPE), k_codes) - tl.sum(q_j, 1)[:, None] * z[None, :]) * sc[None, :]
    return tl.where(valid[None, :], s * sm_scale, float("-inf"))


@triton.jit
def _field_values(p, v_words, f, tok, valid, VS, VZ, stride_vst, offs_d, BITS: tl.constexpr, GROUP: tl.constexpr,
                  SYMMETRIC: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``Σ_t p[:, t] v[t, :]`` ``[BLOCK_H, D]`` fp32 over the tokens of field ``f`` of the value words:
    ``(p∘s_j)·codes - Σ_t p s_j z_j`` per channel group ``j``."""
    N_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    v_codes = _field_codes(v_words, f, BITS, DOT_DTYPE)
    d_group = offs_d // GROUP
    out = tl.zeros([p.shape[0], HEAD_DIM], tl.float32)
    for j in tl.static_range(N_GROUPS):
        sc, z = _token_params(VS, VZ, tok, valid, j, stride_vst, BITS, SYMMETRIC)
        p_j = p * sc[None, :]
        part = tl.dot(p_j.to(DOT_DTYPE), v_codes) - tl.sum(p_j * z[None, :], 1)[:, None]
        if N_GROUPS == 1:
            out += part
        else:
            out += tl.where((d_group == j)[None, :], part, 0.0)
    return out


@triton.jit
def _field_valid(tok, q_end, MASK, HAS_MASK: tl.constexpr):
    valid = tok < q_end
    if HAS_MASK:
        valid = valid & (tl.load(MASK + tok, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _softmax_step(q, k, v, valid, m_i, l_i, acc, sm_scale, DOT_DTYPE: tl.constexpr):
    """One online-softmax step over a [BLOCK_N] block; rows of all -inf stay finite (m_safe)."""
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * sm_scale  # [BLOCK_H, BLOCK_N] fp32
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
    return m_new, l_i, acc


@triton.jit
def _kv_decode_split_kernel(
    # pointers
    Q, KC, KS, KZ, VC, VS, VZ, KR, VR, MASK, O_PART, M_PART, L_PART,
    # sizes
    n_quant, n_res, n_kv_heads, n_rep, tokens_per_split, n_splits, sm_scale,
    # strides (elements; the last dim of every tensor is contiguous)
    stride_qb, stride_qh,
    stride_cb, stride_ch, stride_ct,  # K and V codes (and nothing else)
    stride_ksb, stride_ksh, stride_kst,  # K scales and K zeros
    stride_vsb, stride_vsh, stride_vst,  # V scales and V zeros
    stride_rb, stride_rh, stride_rt,  # K and V residual
    stride_mb,
    # meta
    BITS: tl.constexpr, GROUP: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_DTYPE: tl.constexpr, FIELDS_PER_STEP: tl.constexpr, HAS_QUANT: tl.constexpr,
    ROW_FIELDS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < n_rep
    q = tl.load(Q + b * stride_qb + (hk * n_rep + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None], other=0.0).to(DOT_DTYPE)

    total = n_quant + n_res
    start = pid_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, total)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)

    # quantized tokens [start, min(end, n_quant)): BLOCK_W word rows of P tokens per step
    P: tl.constexpr = 32 // BITS
    kc = KC + b * stride_cb + hk * stride_ch
    vc = VC + b * stride_cb + hk * stride_ch
    ks_off = b * stride_ksb + hk * stride_ksh
    vs_off = b * stride_vsb + hk * stride_vsh
    q_end = tl.minimum(end, n_quant)
    q_f32 = q.to(tl.float32)
    ks, kz, vs, vz, mk = KS + ks_off, KZ + ks_off, VS + vs_off, VZ + vs_off, MASK + b * stride_mb
    l_q = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)  # Σ p per column, reduced once after the loop
    if HAS_QUANT:  # a specialization without the quantized loop keeps the fp16-cache kernel's registers low
        for w0 in range(start // P, tl.cdiv(q_end, P), BLOCK_W // ROW_FIELDS):
            rows = w0 + tl.arange(0, BLOCK_W) // ROW_FIELDS  # tile row i: word row w0 + i // J, fields ≡ i mod J
            sub = tl.arange(0, BLOCK_W) % ROW_FIELDS  # J rows per word row: fewer key groups per 16-row tile
            row_ok = rows * P < q_end
            w_off = rows[:, None] * stride_ct + offs_d[None, :]
            k_words = tl.load(kc + w_off, mask=row_ok[:, None], other=0)
            v_words = tl.load(vc + w_off, mask=row_ok[:, None], other=0)
            # one online-softmax step per FIELDS_PER_STEP fields (BLOCK_W * FIELDS_PER_STEP tokens): the block
            # max first (elementwise over the fields, one row reduction), then p, Σ p and the value dots of
            # every field against it. The second pass recomputes the same scores: the compiler merges the two
            # (common subexpressions), so the step's score tiles stay in registers, which bounds FIELDS_PER_STEP.
            # The steps are a runtime loop (a field's codes are in the low bits after its shifts): unrolled,
            # the compiler hoists work across steps and runs out of registers (int2 spilled, the rest 248).
            kw = k_words >> (sub * BITS)[:, None]
            vw = v_words >> (sub * BITS)[:, None]
            for f0 in range(0, P // ROW_FIELDS, FIELDS_PER_STEP):
                mx = tl.full([BLOCK_H, BLOCK_W], float("-inf"), tl.float32)
                for f in tl.static_range(FIELDS_PER_STEP):
                    tok = rows * P + sub + (f0 + f) * ROW_FIELDS
                    valid = _field_valid(tok, q_end, mk, HAS_MASK)
                    mx = tl.maximum(mx, _field_scores(q_f32, kw, f * ROW_FIELDS, w0, rows, tok, valid, q_end, ks, kz, stride_kst,
                                                      sm_scale, offs_d, BITS, GROUP, KEY_PER_CHANNEL, SYMMETRIC,
                                                      HEAD_DIM, BLOCK_W, BLOCK_H, DOT_DTYPE, ROW_FIELDS))
                m_new = tl.maximum(m_i, tl.max(mx, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                l_q = l_q * alpha[:, None]
                acc = acc * alpha[:, None]
                for f in tl.static_range(FIELDS_PER_STEP):
                    tok = rows * P + sub + (f0 + f) * ROW_FIELDS
                    valid = _field_valid(tok, q_end, mk, HAS_MASK)
                    s = _field_scores(q_f32, kw, f * ROW_FIELDS, w0, rows, tok, valid, q_end, ks, kz, stride_kst, sm_scale,
                                      offs_d, BITS, GROUP, KEY_PER_CHANNEL, SYMMETRIC, HEAD_DIM, BLOCK_W, BLOCK_H,
                                      DOT_DTYPE, ROW_FIELDS)
                    p = tl.exp(s - m_safe[:, None])
                    l_q += p
                    acc += _field_values(p, vw, f * ROW_FIELDS, tok, valid, vs, vz, stride_vst, offs_d, BITS, GROUP, SYMMETRIC,
                                         HEAD_DIM, DOT_DTYPE)
                m_i = m_new
                kw = kw >> (FIELDS_PER_STEP * ROW_FIELDS * BITS)
                vw = vw >> (FIELDS_PER_STEP * ROW_FIELDS * BITS)
    l_i = tl.sum(l_q, 1)

    # full-precision residual tokens [max(start, n_quant), end)
    kr = KR + b * stride_rb + hk * stride_rh
    vr = VR + b * stride_rb + hk * stride_rh
    for n0 in range(tl.maximum(start, n_quant), end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + offs_n, mask=valid, other=0) != 0)
        r_off = (offs_n - n_quant)[:, None] * stride_rt + offs_d[None, :]
        k = tl.load(kr + r_off, mask=valid[:, None], other=0.0)
        v = tl.load(vr + r_off, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, valid, m_i, l_i, acc, sm_scale, DOT_DTYPE)

    # partials [B * H_q, n_splits, (D)] fp32
    row = (pid_bh * n_rep + offs_h) * n_splits + pid_s
    tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_mask[:, None])
    tl.store(M_PART + row, m_i, mask=h_mask)
    tl.store(L_PART + row, l_i, mask=h_mask)


@triton.jit
def _kv_decode_reduce_kernel(O_PART, M_PART, L_PART, OUT, n_splits, n_q_heads, stride_ob, stride_oh,
                             HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # b * H_q + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < n_splits
    m = tl.load(M_PART + pid * n_splits + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(L_PART + pid * n_splits + offs_s, mask=s_mask, other=0.0)
    o = tl.load(O_PART + (pid * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # splits with no tokens weigh 0
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
    b = pid // n_q_heads
    h = pid % n_q_heads
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
