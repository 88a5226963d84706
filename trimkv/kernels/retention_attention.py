"""Retention-gated attention as a FlashAttention-2-style Triton kernel, forward and backward.

The same function as `trimkv.attention.retention_attention_reference`: query t (at position S - T + t) attends
to key i <= its position with the logit

    s_ti = scaling * q_t . k_i + (pos_t - i) * log_beta_i

GQA (query head h reads KV head h // G), causal, and an optional HF attention mask (bool: True = attend, a row
with no allowed key outputs zeros; or float additive). Inputs bf16/fp16 (fp32 works too); logits, softmax
statistics and every accumulator are fp32; gradients for q, k, v and log_beta.

Layout of the work (the FlashAttention-2 recipe, with the per-key slope added to each logit tile):
  forward    one program per (query block, batch x query head); it streams key blocks, keeping the running
             max and sum of exp2 in the log2 domain, and stores O and the row log-sum-exp (log2) for the backward.
  backward   `_bwd_preprocess` delta_t = dO_t . O_t; `_bwd_dkdv` one program per (key block, batch x KV head)
             loops over the G query heads of its KV head and the query blocks at or after it, accumulating dK, dV
             and d log_beta_i = sum_t dL/ds_ti (pos_t - i) without atomics; `_bwd_dq` one program per query block
             streams key blocks for dQ. (dQ by atomic adds in the dK/dV kernel, FlashAttention-2's way, saves two
             products but measured no faster on an H100: docs/benchmarks.md.)
Causality splits every key (query) loop in two: blocks entirely on or below the diagonal, with no mask, and the
blocks that cross it, masked. A bool attention mask is read tile by tile (like FlexAttention's mask_mod); a
fully masked row gets log-sum-exp +inf so its probabilities, output and gradients are exactly zero. A float
mask is floored at -1e30 (HF's dtype-min times log2(e) would overflow to -inf): the same softmax.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


def _configs(options: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) options; one small config under the CPU interpreter, where
    autotuning cannot time anything."""
    if INTERPRET:
        options = [(16, 16, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in options]


# Tuned for H100/H200 with head_dim 128, bf16: the candidates the autotuner times once per (length bucket, head
# dim, group size, mask kind, dtype).
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                        (64, 128, 4, 3)])
DKDV_CONFIGS = _configs([(32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 4, 3),
                         (32, 64, 4, 4), (64, 128, 4, 2)])
DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2),
                       (64, 32, 4, 4)])
TUNING_KEY = ["LEN_KEY", "BLOCK_D", "G", "MASK_KIND"]


# ---- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _logits(q, kT, lb, pos_m, offs_m, start_n, offs_n_f, cols, col_ok, mask_ptrs, stride_ms, qk_scale, T,
            CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """Logits of the query rows against the key block at start_n, in log2 units: q k^T * scale plus the slope
    (pos_t - i) lb_i, then the causal and the given mask. The forward and the dQ pass share it."""
    # (pos_t - i) lb_i = (pos_t - start_n) lb_i - (i - start_n) lb_i: one FMA per logit. Its rounding error,
    # ~6e-8 (pos_t - start_n) |lb_i|, is ~1e-7 of the weight 2^((pos_t - i) lb_i) at worst, at any length
    slope = (pos_m - start_n).to(tl.float32)[:, None] * lb[None, :] - (offs_n_f * lb)[None, :]
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale + slope
    if CAUSAL:
        s = tl.where((pos_m[:, None] >= cols[None, :]) & col_ok[None, :], s, float("-inf"))
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptrs + start_n * stride_ms, mask=(offs_m < T)[:, None] & col_ok[None, :], other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs + start_n * stride_ms, mask=(offs_m < T)[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        s += tl.maximum(bias, -1.0e30) * 1.4426950408889634
    return s


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
              stride_ks, stride_vs, stride_ms, qk_scale, T, S, lo, hi,
              CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = BLOCK_D == D
    d_ok = offs_d < D
    offs_n_f = offs_n.to(tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        if CAUSAL:  # the diagonal blocks may run past S
            kT = tl.load(k_ptrs + start_n * stride_ks, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # (D, N)
            v = tl.load(v_ptrs + start_n * stride_vs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (N, D)
            lb = tl.load(lb_ptr + cols, mask=col_ok, other=0.0) * 1.4426950408889634
        elif EVEN_D:  # below the diagonal every key exists: unmasked loads
            kT = tl.load(k_ptrs + start_n * stride_ks)
            v = tl.load(v_ptrs + start_n * stride_vs)
            lb = tl.load(lb_ptr + cols) * 1.4426950408889634
        else:
            kT = tl.load(k_ptrs + start_n * stride_ks, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vs, mask=d_ok[None, :], other=0.0)
            lb = tl.load(lb_ptr + cols) * 1.4426950408889634
        s = _logits(q, kT, lb, pos_m, offs_m, start_n, offs_n_f, cols, col_ok, mask_ptrs, stride_ms, qk_scale, T,
                    CAUSAL, MASK_KIND, PRECISION)  # (M, N), log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=FWD_CONFIGS, key=TUNING_KEY)
@triton.jit
def _fwd(Q, K, V, LB, MASK, O, LSE,
         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
         stride_ob, stride_oh, stride_ot, stride_mb, stride_mh, stride_mt, stride_ms,
         qk_scale, T, S, LEN_KEY,
         HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr,
         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first: better tail of the causal grid
    pid_bh = tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // G
    offset = S - T
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = offs_m + offset
    d_ok = offs_d < D
    b64 = b.to(tl.int64)

    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m < T)[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    lb_ptr = LB + (b64 * (HQ // G) + hk) * S
    mask_ptrs = (MASK + b64 * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mt
                 + offs_n[None, :] * stride_ms)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full = (start_m + offset + 1) // BLOCK_N * BLOCK_N  # key blocks [0, full) are allowed for every row
    full = tl.minimum(tl.maximum(full, 0), S)
    hi = tl.minimum(start_m + BLOCK_M + offset, S)  # past the last row's position
    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
                              stride_ks, stride_vs, stride_ms, qk_scale, T, S, 0, full,
                              False, MASK_KIND, D, BLOCK_D, BLOCK_N, PRECISION)
    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
                              stride_ks, stride_vs, stride_ms, qk_scale, T, S, full, hi,
                              True, MASK_KIND, D, BLOCK_D, BLOCK_N, PRECISION)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # +inf: p = exp2(s - lse) = 0 in the backward
    row_ok = offs_m < T
    tl.store(O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


# ---- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, T,
                    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // HQ).to(tl.int64), pid_bh % HQ
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_tile(dk, dv, dlb, k, v, lb, q_ptrs, do_ptrs, lse_ptr, delta_ptr, mask_ptrs, offs_m, offs_n, offs_d,
               stride_qt, stride_dot, stride_mt, qk_scale, offset, T, S, lo, hi,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr):
    d_ok = offs_d < D
    col_ok = offs_n < S
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        qT = tl.load(q_ptrs + start_m * stride_qt, mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # (D, M)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        distT = (rows[None, :] + offset - offs_n[:, None]).to(tl.float32)  # (N, M): pos_t - i
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale + distT * lb[:, None]
        if CAUSAL:
            sT = tl.where(distT >= 0, sT, float("-inf"))
        if MASK_KIND == 1:
            allowed = tl.load(mask_ptrs + rows[None, :].to(tl.int64) * stride_mt, mask=col_ok[:, None] & row_ok[None, :],
                              other=0)
            sT = tl.where(allowed != 0, sT, float("-inf"))
        if MASK_KIND == 2:
            bias = tl.load(mask_ptrs + rows[None, :].to(tl.int64) * stride_mt, mask=col_ok[:, None] & row_ok[None, :],
                           other=0.0).to(tl.float32)
            sT += tl.maximum(bias, -1.0e30) * 1.4426950408889634
        pT = tl.exp2(sT - lse[None, :])  # (N, M) probabilities
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])  # d loss / d logit
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        dlb += tl.sum(dsT * distT, 1)
    return dk, dv, dlb


@triton.autotune(configs=DKDV_CONFIGS, key=TUNING_KEY)
@triton.jit
def _bwd_dkdv(Q, K, V, LB, MASK, DO, LSE, DELTA, DK, DV, DLB,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
              stride_dob, stride_doh, stride_dot, stride_mb, stride_mh, stride_mt, stride_ms,
              stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
              sm_scale, qk_scale, T, S, LEN_KEY,
              HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HKV: tl.constexpr = HQ // G
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hk = pid_bh // HKV, pid_bh % HKV
    b64 = b.to(tl.int64)
    offset = S - T
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    col_ok = offs_n < S
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok,
                other=0.0)
    v = tl.load(V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok,
                other=0.0)
    lb = tl.load(LB + pid_bh.to(tl.int64) * S + offs_n, mask=col_ok, other=0.0) * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dlb = tl.zeros([BLOCK_N], tl.float32)
    lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M  # first query block that sees this key block
    full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M  # from here: all allowed
    full = tl.minimum(tl.maximum(full, lo), T)
    for g in range(G):
        h = hk * G + g
        q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None]
        do_ptrs = DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
        lse_ptr = LSE + (b64 * HQ + h) * T
        delta_ptr = DELTA + (b64 * HQ + h) * T
        mask_ptrs = MASK + b64 * stride_mb + h * stride_mh + offs_n[:, None] * stride_ms  # + row offsets per tile
        dk, dv, dlb = _dkdv_tile(dk, dv, dlb, k, v, lb, q_ptrs, do_ptrs, lse_ptr, delta_ptr, mask_ptrs, offs_m,
                                 offs_n, offs_d, stride_qt, stride_dot, stride_mt, qk_scale, offset, T, S, lo, full,
                                 True, MASK_KIND, D, BLOCK_M, PRECISION)
        dk, dv, dlb = _dkdv_tile(dk, dv, dlb, k, v, lb, q_ptrs, do_ptrs, lse_ptr, delta_ptr, mask_ptrs, offs_m,
                                 offs_n, offs_d, stride_qt, stride_dot, stride_mt, qk_scale, offset, T, S, full, T,
                                 False, MASK_KIND, D, BLOCK_M, PRECISION)
    tl.store(DK + b64 * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b64 * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)
    tl.store(DLB + pid_bh.to(tl.int64) * S + offs_n, dlb, mask=col_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
             stride_ks, stride_vs, stride_ms, qk_scale, T, S, lo, hi,
             CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    EVEN_D: tl.constexpr = BLOCK_D == D
    d_ok = offs_d < D
    offs_n_f = offs_n.to(tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        if CAUSAL:
            kT = tl.load(k_ptrs + start_n * stride_ks, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # (D, N)
            vT = tl.load(v_ptrs + start_n * stride_vs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)  # (D, N)
            lb = tl.load(lb_ptr + cols, mask=col_ok, other=0.0) * 1.4426950408889634
        elif EVEN_D:
            kT = tl.load(k_ptrs + start_n * stride_ks)
            vT = tl.load(v_ptrs + start_n * stride_vs)
            lb = tl.load(lb_ptr + cols) * 1.4426950408889634
        else:
            kT = tl.load(k_ptrs + start_n * stride_ks, mask=d_ok[:, None], other=0.0)
            vT = tl.load(v_ptrs + start_n * stride_vs, mask=d_ok[:, None], other=0.0)
            lb = tl.load(lb_ptr + cols) * 1.4426950408889634
        s = _logits(q, kT, lb, pos_m, offs_m, start_n, offs_n_f, cols, col_ok, mask_ptrs, stride_ms, qk_scale, T,
                    CAUSAL, MASK_KIND, PRECISION)  # (M, N), log2 units
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=TUNING_KEY)
@triton.jit
def _bwd_dq(Q, K, V, LB, MASK, DO, LSE, DELTA, DQ,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
            stride_dob, stride_doh, stride_dot, stride_mb, stride_mh, stride_mt, stride_ms,
            stride_dqb, stride_dqh, stride_dqt,
            sm_scale, qk_scale, T, S, LEN_KEY,
            HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // G
    b64 = b.to(tl.int64)
    offset = S - T
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = offs_m + offset
    row_ok = offs_m < T
    qo_ok = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qo_ok,
                other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=qo_ok, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vs + offs_d[:, None]
    lb_ptr = LB + (b64 * (HQ // G) + hk) * S
    mask_ptrs = (MASK + b64 * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mt
                 + offs_n[None, :] * stride_ms)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full = (start_m + offset + 1) // BLOCK_N * BLOCK_N
    full = tl.minimum(tl.maximum(full, 0), S)
    hi = tl.minimum(start_m + BLOCK_M + offset, S)
    dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
                  stride_ks, stride_vs, stride_ms, qk_scale, T, S, 0, full, False, MASK_KIND, D, BLOCK_D, BLOCK_N, PRECISION)
    dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, lb_ptr, mask_ptrs, offs_m, pos_m, offs_n, offs_d,
                  stride_ks, stride_vs, stride_ms, qk_scale, T, S, full, hi, True, MASK_KIND, D, BLOCK_D, BLOCK_N, PRECISION)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qo_ok)


# ---- autograd wrapper ----------------------------------------------------------------------------------------

def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(mask: Tensor | None, B: int, Hq: int, T: int, S: int, device) -> tuple[int, Tensor, tuple]:
    """(kind, tensor, strides (b, h, t, s)) for the kernel; size-1 (broadcast) dims get stride 0."""
    if mask is None:
        return MASK_NONE, torch.empty(1, device=device, dtype=torch.uint8), (0, 0, 0, 0)
    if mask.dim() != 4 or mask.shape[1] not in (1, Hq) or mask.shape[0] not in (1, B) or \
            tuple(mask.shape[2:]) != (T, S):
        raise ValueError(f"attention_mask must have shape ({B} or 1, 1 or {Hq}, {T}, {S}), got {tuple(mask.shape)}")
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
    if kind == MASK_BOOL:
        mask = mask.view(torch.uint8)
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    return kind, mask, strides


def _common(q: Tensor, k: Tensor, log_beta: Tensor):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    len_key = triton.next_power_of_2(max(S, 1))  # autotune once per power-of-two length, not per length
    return B, Hq, T, D, Hkv, S, block_d, precision, len_key


class RetentionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_beta, scaling, mask):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        B, Hq, T, D, Hkv, S, block_d, precision, len_key = _common(q, k, log_beta)
        lb = log_beta.float().contiguous()  # (B, Hkv, S)
        out = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, Hq, T, D) view
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # log2 units
        kind, mask_t, ms = _mask_args(mask, B, Hq, T, S, q.device)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)
        _fwd[grid](q, k, v, lb, mask_t, out, lse,
                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *ms,
                   scaling * LOG2E, T, S, len_key,
                   HQ=Hq, G=Hq // Hkv, D=D, BLOCK_D=block_d, MASK_KIND=kind, PRECISION=precision)
        ctx.save_for_backward(q, k, v, lb, out, lse, mask_t)
        ctx.scaling, ctx.kind, ctx.mask_strides, ctx.lb_dtype = scaling, kind, ms, log_beta.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lb, out, lse, mask_t = ctx.saved_tensors
        dout = _last_dim_contiguous(dout)
        B, Hq, T, D, Hkv, S, block_d, precision, len_key = _common(q, k, lb)
        G, ms, kind, scaling = Hq // Hkv, ctx.mask_strides, ctx.kind, ctx.scaling
        delta = torch.empty_like(lse)
        rows = 16 if INTERPRET else 64
        _bwd_preprocess[(triton.cdiv(T, rows), B * Hq)](
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), T, HQ=Hq, D=D, BLOCK_D=block_d, BLOCK_M=rows)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dlb = torch.empty_like(lb)
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2), *ms)
        consts = {"HQ": Hq, "G": G, "D": D, "BLOCK_D": block_d, "MASK_KIND": kind, "PRECISION": precision}
        _bwd_dkdv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, lb, mask_t, dout, lse, delta, dk, dv, dlb, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            scaling, scaling * LOG2E, T, S, len_key, **consts)
        _bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)](
            q, k, v, lb, mask_t, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2),
            scaling, scaling * LOG2E, T, S, len_key, **consts)
        return dq, dk, dv, dlb.to(ctx.lb_dtype), None, None


def retention_attention_triton(
    query: Tensor,  # (B, Hq, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    log_beta: Tensor,  # (B, Hkv, S), <= 0
    scaling: float | None = None,
    attention_mask: Tensor | None = None,  # (B or 1, 1 or Hq, T, S): bool True = attend, or float additive
) -> Tensor:  # (B, Hq, T, D), query's dtype
    """Same function as `trimkv.attention.retention_attention_reference` (queries at positions S - T .. S - 1),
    by the Triton kernels above; differentiable in query, key, value and log_beta."""
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if key.shape != (B, Hkv, S, D) or value.shape != key.shape:
        raise ValueError(f"key and value must have shape {(B, Hkv, S, D)}, got {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if log_beta.shape != (B, Hkv, S):
        raise ValueError(f"log_beta must have shape {(B, Hkv, S)}, got {tuple(log_beta.shape)}")
    if T > S:
        raise ValueError(f"more queries ({T}) than keys ({S})")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if query.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton retention attention runs on CUDA, got a tensor on {query.device}")
    scaling = D**-0.5 if scaling is None else float(scaling)
    return RetentionAttention.apply(query, key, value, log_beta, scaling, attention_mask)
