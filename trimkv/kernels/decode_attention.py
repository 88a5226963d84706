"""Attention of one new token per row over a bounded cache's slots, split over the slots (flash-decoding).

A decode step on the bounded cache attends B rows x H_kv KV heads, each over M + buffer slots, with the G query
heads of a KV head as G query rows. SDPA's kernels give each (row, KV head) one thread block: 32 blocks at batch
4 on a 132-SM H200, 26 us a layer where reading K and V takes 4.5 us (issue 9's profile). Here each
(row, KV head) is cut into splits of the slots, every split a thread block with its own running softmax; a
second kernel merges the splits by their log-sum-exp.

    decode_attention(query (B, H_q, 1, D), key (B, H_kv, N, D), value (B, H_kv, N, D), mask, scale)
        -> (B, H_q, 1, D); mask: (B, 1 or H_q, 1, N) bool, True = attend (the cache's 4-D mask)

Registered as the custom op `trimkv::decode_attention`, so `torch.compile` and CUDA graphs take it whole.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # slots per inner iteration
TARGET_PROGRAMS = 1024  # enough thread blocks to spread one step's K/V reads over every SM
# (32 and 1,024: the fastest of BLOCK_N 32 / 64 x 256-2,048 programs x 2-3 stages at Table 5's shapes, H100)
NUM_WARPS, NUM_STAGES = 4, 2


@triton.jit
def _split_kernel(Q, K, V, Mask, Out, Lse, scale, N, split_n, n_splits, H_kv,
                  sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                  PER_HEAD_MASK: tl.constexpr, IEEE: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H_kv, bh % H_kv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)  # head dims padded to a power of two (Phi-3: 96 -> 128), the pad masked
    heads = h * G + g
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=(g[:, None] < G) & (d[None, :] < D),
                other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    start = split * split_n
    end = tl.minimum(start + split_n, N)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        valid = n < end
        k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if PER_HEAD_MASK:
            keep = tl.load(Mask + b * sm_b + heads[:, None] * sm_h + n[None, :],
                           mask=(g[:, None] < G) & valid[None, :], other=0) != 0
        else:
            keep = (tl.load(Mask + b * sm_b + n, mask=valid, other=0) != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing to attend yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                    other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    row = (b * H_kv * G + heads) * n_splits + split  # Out (B * H_q, n_splits, D), Lse (B * H_q, n_splits)
    tl.store(Out + row[:, None] * D + d[None, :], out, mask=(g[:, None] < G) & (d[None, :] < D))
    tl.store(Lse + row, lse, mask=g < G)


@triton.jit
def _merge_kernel(Part, Lse, Out, n_splits, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    lse = tl.load(Lse + row * n_splits + s, mask=s < n_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    part = tl.load(Part + (row * n_splits + s)[:, None] * D + d[None, :],
                   mask=(s < n_splits)[:, None] & (d[None, :] < D), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty), mask=d < D)


def splits_for(rows: int, n: int) -> int:
    """How many splits each (row, KV head) gets: ~TARGET_PROGRAMS thread blocks, at least BLOCK_N slots each."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, rows), triton.cdiv(n, BLOCK_N)))


@torch.library.custom_op("trimkv::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    B, Hq, q_len, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    if q_len != 1 or Hq % Hkv or mask.dtype != torch.bool:
        raise ValueError("decode_attention: one query token, H_q a multiple of H_kv, and a bool mask")
    G = Hq // Hkv
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    q = query[:, :, 0].contiguous()
    m = mask[:, :, 0]
    m = m if m.stride(-1) == 1 else m.contiguous()
    per_head = m.shape[1] != 1
    d_pad = max(16, triton.next_power_of_2(D))
    n_splits = splits_for(B * Hkv, N)
    split_n = triton.cdiv(triton.cdiv(N, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(N, split_n)
    part = torch.empty(B * Hq, n_splits, D, device=query.device, dtype=torch.float32)
    lse = torch.empty(B * Hq, n_splits, device=query.device, dtype=torch.float32)
    _split_kernel[(B * Hkv, n_splits)](
        q, key, value, m.view(torch.int8), part, lse, scale, N, split_n, n_splits, Hkv,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), m.stride(0), m.stride(1) if per_head else 0,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, D_PAD=d_pad, BLOCK=BLOCK_N, PER_HEAD_MASK=per_head,
        IEEE=query.dtype == torch.float32, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    out = torch.empty(B, Hq, 1, D, device=query.device, dtype=query.dtype)
    _merge_kernel[(B * Hq,)](part, lse, out, n_splits, D=D, D_PAD=d_pad, S_PAD=triton.next_power_of_2(n_splits),
                             num_warps=4)
    return out


@decode_attention.register_fake
def _(query, key, value, mask, scale):
    return torch.empty_like(query)
