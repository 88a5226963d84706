"""The capacity sums of the TRIM-KV loss as a Triton kernel, forward and backward.

    S_t = sum_{i<=t} beta_i^(t-i) = sum_{i<=t} exp2((t - i) * log2(e) * log beta_i)       per row, t = 0 .. T-1
    d S_t / d log beta_i = (t - i) beta_i^(t-i)                                              for i <= t

Every term lies in [0, 1] and the i = t term is 1, so S_t is summed directly in fp32: no running maximum, and
a term that underflows is below S_t's rounding. Forward: one program per (block of t, row) streams the key
blocks i <= t. Backward: one program per (block of i, row) streams the blocks t >= i, so d log beta needs no
atomics. T^2 / 2 exponentials per row each way; nothing of size T x T is stored.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_T, BLOCK_I = (16, 16) if INTERPRET else (64, 128)


@triton.jit
def _capacity_fwd(LB, OUT, T, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    start_t = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_T  # longest rows first
    offs_t = start_t + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_I)
    lb_row = LB + row * T
    acc = tl.zeros([BLOCK_T], tl.float32)
    full = (start_t + 1) // BLOCK_I * BLOCK_I  # key blocks [0, full) lie entirely at or before every t
    for start_i in range(0, full, BLOCK_I):
        cols = start_i + offs_i
        lb = tl.load(lb_row + cols) * 1.4426950408889634
        acc += tl.sum(tl.exp2((offs_t[:, None] - cols[None, :]).to(tl.float32) * lb[None, :]), 1)
    for start_i in range(full, tl.minimum(start_t + BLOCK_T, T), BLOCK_I):
        cols = start_i + offs_i
        lb = tl.load(lb_row + cols, mask=cols < T, other=0.0) * 1.4426950408889634
        dist = (offs_t[:, None] - cols[None, :]).to(tl.float32)
        acc += tl.sum(tl.exp2(tl.where(dist >= 0, dist * lb[None, :], float("-inf"))), 1)
    tl.store(OUT + row * T + offs_t, acc, mask=offs_t < T)


@triton.jit
def _capacity_bwd(LB, GRAD, DLB, T, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    start_i = tl.program_id(0) * BLOCK_I
    offs_i = start_i + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    lb = tl.load(LB + row * T + offs_i, mask=offs_i < T, other=0.0) * 1.4426950408889634
    grad_row = GRAD + row * T
    acc = tl.zeros([BLOCK_I], tl.float32)
    lo = start_i // BLOCK_T * BLOCK_T
    full = tl.minimum(tl.cdiv(start_i + BLOCK_I - 1, BLOCK_T) * BLOCK_T, T)  # from here t >= every i of the block
    for start_t in range(lo, full, BLOCK_T):
        rows = start_t + offs_t
        g = tl.load(grad_row + rows, mask=rows < T, other=0.0)
        dist = (rows[:, None] - offs_i[None, :]).to(tl.float32)  # (t, i)
        term = tl.exp2(tl.where(dist >= 0, dist * lb[None, :], float("-inf")))
        acc += tl.sum(g[:, None] * dist * term, 0)
    for start_t in range(full, T, BLOCK_T):
        rows = start_t + offs_t
        g = tl.load(grad_row + rows, mask=rows < T, other=0.0)
        dist = (rows[:, None] - offs_i[None, :]).to(tl.float32)
        acc += tl.sum(g[:, None] * dist * tl.exp2(dist * lb[None, :]), 0)
    tl.store(DLB + row * T + offs_i, acc, mask=offs_i < T)


class CapacitySums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_beta: Tensor) -> Tensor:
        T = log_beta.shape[-1]
        lb = log_beta.float().reshape(-1, T).contiguous()  # (N, T)
        out = torch.empty_like(lb)
        if lb.numel():
            _capacity_fwd[(triton.cdiv(T, BLOCK_T), lb.shape[0])](lb, out, T, BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I,
                                                                   num_warps=4)
        ctx.save_for_backward(lb)
        ctx.shape, ctx.dtype = log_beta.shape, log_beta.dtype
        return out.view(log_beta.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (lb,) = ctx.saved_tensors
        T = lb.shape[-1]
        g = grad.float().reshape(-1, T).contiguous()
        dlb = torch.empty_like(lb)
        if lb.numel():
            _capacity_bwd[(triton.cdiv(T, BLOCK_I), lb.shape[0])](lb, g, dlb, T, BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I,
                                                                   num_warps=4)
        return dlb.view(ctx.shape).to(ctx.dtype)


def capacity_sums(log_beta: Tensor) -> Tensor:
    """S_t = sum_{i<=t} exp((t - i) log_beta_i) over the last dim: (..., T) -> (..., T), float32, differentiable
    in log_beta. The same values as `trimkv.train.losses.log_capacity(log_beta).exp()`."""
    if log_beta.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the Triton capacity kernel runs on CUDA, got a tensor on {log_beta.device}")
    return CapacitySums.apply(log_beta)
