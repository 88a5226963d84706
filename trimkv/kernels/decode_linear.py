"""A linear layer over the few rows of a decode step (one token per sequence), split over the inner dimension.

A decode step at batch 4-8 multiplies 4-8 rows by every weight matrix: the time is reading the weights. A matrix
with few output columns (o_proj, down_proj: 2,560) gives cuBLAS too few thread blocks to keep every SM reading:
at Qwen3-4B's shapes on an H100 it reads o_proj at 58% of the copy bandwidth and a step's products at 81-82%,
where this kernel reads them at 72% and 87-88% (`python -m trimkv bench kernels`, docs/benchmarks.md). Here
each thread block takes BLOCK_N output columns and every SPLIT_K-th BLOCK_K-wide slice of the inner dimension, so
a step's product spreads over hundreds of blocks; the SPLIT_K partial sums (fp32) are added in a fixed order
afterwards (by the caller, where `torch.compile` fuses the sum into the next operation): the same bits on every
run.

    decode_linear(x (M, K), weight (N, K)) -> (M, N), M <= MAX_ROWS, x's dtype (fp16 / bf16)

The kernel is the custom op `trimkv::decode_linear_partials`, so `torch.compile` and CUDA graphs take it whole;
`trimkv.decode.StepLinear` calls it for the captured decode step's linear layers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest tile: every row count up to it costs the same
BLOCK_N = 32  # output columns per thread block: of 32, 64 and 128, 32 was fastest at Qwen3-4B's shapes (H100)
PROGRAMS = 4  # thread blocks per SM to aim for: enough loads in flight, and a short last wave
MIN_SLICE = 512  # the narrowest slice of the inner dimension a thread block takes (two of the widest BLOCK_K)


def split_for(N: int, K: int, sms: int) -> int:
    """Slices of the inner dimension: a power of two that brings the column blocks up to PROGRAMS per SM, each
    slice at least MIN_SLICE wide. Chosen on the host from the shapes, so the partial sums' shape is static."""
    split, blocks = 1, triton.cdiv(N, BLOCK_N)
    while blocks * split * 2 <= PROGRAMS * sms and K // (split * 2) >= MIN_SLICE:
        split *= 2
    return split


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter times nothing: one config
        return [triton.Config({"BLOCK_K": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=st) for k in (128, 256) for w in (4, 8)
            for st in (2, 3, 4)]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "SPLIT_K"])
@triton.jit
def _decode_linear_kernel(X, W, Part, M, N, stride_xm, stride_wn, K: tl.constexpr, SPLIT_K: tl.constexpr,
                          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    m = tl.arange(0, M_PAD)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        k = k0 + split * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(Part + split * M * N + m[:, None] * N + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _sum_kernel(Part, Y, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.load(Part + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(Part + s * size + offs, mask=ok, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, so the tests split
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.custom_op("trimkv::decode_linear_partials", mutates_args=())
def decode_linear_partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(SPLIT_K, M, N) fp32 partial products of x (M, K) and weight (N, K) over slices of K: their sum is x W^T.
    The sum is left to the caller, so `torch.compile` fuses it (and the cast) into what follows."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or weight.shape[1] != K or x.dtype != weight.dtype:
        raise ValueError(f"decode_linear: at most {MAX_ROWS} rows and a ({N}, {K}) weight of x's dtype, got x "
                         f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    split = split_for(N, K, _sms(x.device))
    part = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    _decode_linear_kernel[(triton.cdiv(N, BLOCK_N), split)](x, weight, part, M, N, x.stride(0), weight.stride(0), K=K,
                                                            SPLIT_K=split, M_PAD=MAX_ROWS, BLOCK_N=BLOCK_N)
    return part


@decode_linear_partials.register_fake
def _(x, weight):
    N, K = weight.shape
    return x.new_empty(split_for(N, K, _sms(x.device)), x.shape[0], N, dtype=torch.float32)


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) W^T (N, K) -> (M, N) in x's dtype (fp16/bf16), M <= MAX_ROWS; the partial sums added in a fixed
    order, so the same bits on every run, compiled or not. Under `torch.compile` the sum is left to inductor (it
    fuses it into the next operation); run eagerly, one kernel adds and casts."""
    part = decode_linear_partials(x, weight)
    if torch.compiler.is_compiling():
        # added one by one, in the eager kernel's order: pointwise, so inductor fuses the sum into the next kernel
        # even where that one reduces (RMSNorm after o_proj and down_proj). part.sum(0) is a reduction, which
        # inductor unrolls like this only below 8 splits (unroll_reductions_threshold); from 8 on it ran as a
        # kernel of its own after every such product (72 a step at Qwen3-4B's split of 8, BLOCK_N 64)
        y = part[0]
        for s in range(1, part.shape[0]):
            y = y + part[s]
        return y.to(x.dtype)
    y = torch.empty(part.shape[1:], device=x.device, dtype=x.dtype)
    _sum_kernel[(triton.cdiv(y.numel(), 1024),)](part, y, y.numel(), SPLIT_K=part.shape[0], BLOCK=1024)
    return y


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_linear` takes this product: a CUDA fp16/bf16 input of at most MAX_ROWS rows."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype
            and x.shape[:-1].numel() <= MAX_ROWS)
