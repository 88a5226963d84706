"""The TRIM-KV training objective (arXiv 2512.03324): distillation from the frozen base model plus a capacity term.

Only the retention gates train. The same base model is its own teacher: plain attention gives the teacher's
next-token distribution p, retention-gated attention gives the student's q, and

    L = w_kl * KL(p || q) + w_ntp * NTP(q) + w_cap * L_cap          defaults w = 1/2, 1/2, 1

so the default total is (KL + NTP) / 2 + L_cap, the paper's objective with lambda_cap = 1 (upstream's
configs: `base_loss='fwkl'`, `retention_weight=1.0`).

Capacity. Token i's weight for query t decays as beta_i^(t-i), so the attention mass the cache must hold at
step t is, per layer and KV head,

    S_t = sum_{i<=t} beta_i^(t-i)          (upstream's `power_stair(...).sum(-1)`: the i = t term is 1)

and a budget of M slots asks S_t <= M. Two penalties on the excess, t counted from 1 (the number of tokens
seen, so S_t <= t and nothing is penalised before t > M):

    paper      mean over (layer, head, t) of max(0, S_t - M) / t
    released   max(0, (S_t - M) / max(t - M, 1)), averaged over the entries where it is positive
               (the released-code form; the default)

S_t has no first-order recurrence (every token decays at its own rate): log S_t = logsumexp_{i<=t} (t-i)
log beta_i is evaluated directly, in float32, never as a T x T tensor per head. On CUDA `log_capacity_flex`
lets FlexAttention's fused kernel do it (the log-sum-exp of an attention with zero scores and this score_mod);
elsewhere `log_capacity` takes a block of query rows at a time and recomputes each block in the backward pass.
At 16K tokens on a Qwen3-1.7B shape (H200) the fused path cut the capacity term from 4.1 s to 0.7 s per step.
Likewise the (tokens x vocab) logits of KL and NTP exist only a block of positions at a time.

`objective(model, ids, ...)` runs teacher and student on one batch and returns every part of the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from trimkv.attention import BACKENDS

CAPACITY_FORMS = ("released", "paper")
LOSS_PARTS = ("kl", "ntp", "capacity")
DEFAULT_WEIGHTS = {"kl": 0.5, "ntp": 0.5, "capacity": 1.0}  # (KL + NTP) / 2 + lambda_cap * L_cap, lambda_cap = 1
RETENTION_IMPLEMENTATIONS = tuple(f"trimkv_{name}" for name in BACKENDS)  # the student's attention


def _log_capacity_block(log_beta: Tensor, t0: int) -> Tensor:
    """log S_t for t in [t0, t1), t1 = log_beta.shape[-1]: (..., t1) -> (..., t1 - t0)."""
    t1 = log_beta.shape[-1]
    t = torch.arange(t0, t1, device=log_beta.device).unsqueeze(1)  # (C, 1)
    i = torch.arange(t1, device=log_beta.device).unsqueeze(0)  # (1, t1)
    distance = t - i  # (C, t1); negative above the diagonal
    terms = distance * log_beta.unsqueeze(-2)  # (..., C, t1)
    terms = terms.masked_fill(distance < 0, float("-inf"))
    return torch.logsumexp(terms, dim=-1)  # the i = t term is 0, so never -inf


_compiled_flex: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention  # eager: forward only on CPU (tests)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device):
    return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)


def log_capacity_flex(log_beta: Tensor) -> Tensor:
    """log S_t by FlexAttention, fused on CUDA: with zero queries and keys every score is 0, the score_mod adds
    (t - i) log beta_i, and the kernel's log-sum-exp over causal keys is log S_t; its backward gives d/d log beta.
    (..., T) -> (..., T), float32; the same values as `log_capacity`, without its O(T^2) memory traffic."""
    shape, T = log_beta.shape, log_beta.shape[-1]
    lb = log_beta.float().reshape(1, -1, T)  # (1, N, T): every (batch, head) row is one attention head
    zeros = torch.zeros(1, lb.shape[1], T, 16, device=lb.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * lb[b, h, kv_idx]

    _, aux = _flex_fn(lb.device)(zeros, zeros, zeros, score_mod=score_mod,
                                 block_mask=_causal_block_mask(T, lb.device), return_aux=AuxRequest(lse=True))
    return aux.lse.reshape(shape)  # natural log


def log_capacity(log_beta: Tensor, block_elements: int = 1 << 24) -> Tensor:
    """log S_t = log sum_{i<=t} beta_i^(t-i), over the last dim: log_beta (..., T) -> (..., T), float32.

    Query rows are processed in blocks of C rows, C * T * prod(leading dims) <= block_elements (at least one
    row), so peak extra memory is a few such blocks, also in the backward pass.
    """
    log_beta = log_beta.float()
    T = log_beta.shape[-1]
    lead = log_beta.numel() // max(T, 1)
    rows = max(1, block_elements // max(lead * T, 1))
    blocks = []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        if log_beta.requires_grad:
            blocks.append(checkpoint(_log_capacity_block, log_beta[..., :t1], t0, use_reentrant=False))
        else:
            blocks.append(_log_capacity_block(log_beta[..., :t1], t0))
    return torch.cat(blocks, dim=-1)


def capacity_loss(log_betas: list[Tensor], memory_size: int, form: str = "released",
                  block_elements: int = 1 << 24, backend: str = "auto") -> Tensor:
    """L_cap over all layers: log_betas is one (B, T, H_kv) tensor per layer (the gates' outputs).

    backend: how S_t is computed: "triton" (`trimkv.kernels.capacity`, CUDA), "flex" (`log_capacity_flex`,
    CUDA), "blocks" (`log_capacity`, any device); "auto" = triton on CUDA if installed, else flex; blocks on CPU.

    form "released": sum of the positive max(0, (S_t - M) / max(t - M, 1)) over every (layer, batch, head, t),
    divided by how many are positive (0 if none). form "paper": mean of max(0, S_t - M) / t over all of them.
    """
    if form not in CAPACITY_FORMS:
        raise ValueError(f"unknown capacity form {form!r}; choose one of {CAPACITY_FORMS}")
    if memory_size <= 0:
        raise ValueError(f"memory_size must be > 0, got {memory_size}")
    device = log_betas[0].device
    if backend == "auto":
        from trimkv import kernels

        backend = ("triton" if kernels.available() else "flex") if device.type == "cuda" else "blocks"
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for log_beta in log_betas:
        lb = log_beta.transpose(1, 2)  # (B, H, T)
        if backend == "triton":
            from trimkv.kernels.capacity import capacity_sums

            S = capacity_sums(lb)
        else:
            S = (log_capacity_flex(lb) if backend == "flex" else log_capacity(lb, block_elements)).exp()
        t = torch.arange(1, S.shape[-1] + 1, device=S.device, dtype=S.dtype)  # tokens seen at step t
        if form == "paper":
            excess = F.relu(S - memory_size) / t
            count = count + excess.numel()
        else:
            excess = F.relu((S - memory_size) / (t - memory_size).clamp(min=1))
            count = count + (excess > 0).sum()
        total = total + excess.sum()
    return total / count.clamp(min=1)


def _distill_block(student: Tensor, teacher: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]):
    """Summed KL(p_teacher || q_student) and NTP over a block of positions: (N, d), (N, d), (N,) -> 2 scalars."""
    log_q = F.log_softmax(head(student).float(), dim=-1)  # (N, V)
    with torch.no_grad():
        log_p = F.log_softmax(head(teacher).float(), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    ntp = F.nll_loss(log_q, labels, reduction="sum")
    return kl, ntp


def distillation_losses(student_hidden: Tensor, teacher_hidden: Tensor, input_ids: Tensor,
                        head: Callable[[Tensor], Tensor], block_tokens: int = 1024) -> tuple[Tensor, Tensor]:
    """Mean forward KL(teacher || student) and next-token cross-entropy over positions 0 .. T-2.

    student_hidden / teacher_hidden: (B, T, d), the decoder's final hidden states; head maps them to logits.
    The (tokens x vocab) logits exist only for `block_tokens` positions at a time, in both passes.
    """
    d = student_hidden.shape[-1]
    student = student_hidden[:, :-1].reshape(-1, d)  # position t predicts token t + 1
    teacher = teacher_hidden[:, :-1].reshape(-1, d)
    labels = input_ids[:, 1:].reshape(-1)
    n = labels.numel()
    if n == 0:
        raise ValueError("distillation needs sequences of at least 2 tokens")
    kl = ntp = torch.zeros((), device=student.device)
    for s in range(0, n, block_tokens):
        e = min(n, s + block_tokens)
        args = (student[s:e], teacher[s:e], labels[s:e], head)
        if student.requires_grad:
            kl_b, ntp_b = checkpoint(_distill_block, *args, use_reentrant=False)
        else:
            kl_b, ntp_b = _distill_block(*args)
        kl, ntp = kl + kl_b, ntp + ntp_b
    return kl / n, ntp / n


def total_loss(parts: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * parts[k] over LOSS_PARTS (DEFAULT_WEIGHTS: the paper's objective)."""
    return sum(weights[k] * parts[k] for k in LOSS_PARTS)


def objective(model, ids: Tensor, memory_size: int, teacher: str, weights: dict[str, float] | None = None,
              capacity_form: str = "released", logit_block: int = 1024, length: int | None = None
              ) -> dict[str, Tensor]:
    """The training objective on one batch ids (B, T): {"loss", "kl", "ntp", "capacity", "beta_mean"}.

    Student: the model as it is set, with a retention-gated attention implementation (trimkv_reference /
    trimkv_flex); keep it set until backward() is done, since gradient checkpointing recomputes the student's
    layers then. Teacher: the same weights with the plain implementation `teacher` (e.g. "sdpa"), no grad.
    The capacity loss reads the log beta that the student's attention used. beta_mean is for logging.
    length: count only the first `length` tokens (the rest is right padding, which causal attention keeps
    from influencing them).
    """
    if model.config._attn_implementation not in RETENTION_IMPLEMENTATIONS:
        raise ValueError(f"the student needs attn_implementation in {RETENTION_IMPLEMENTATIONS}, "
                         f"got {model.config._attn_implementation!r}")
    weights = weights or DEFAULT_WEIGHTS
    with torch.no_grad(), attention_implementation(model, teacher):
        teacher_hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d)
    with GateRecorder(model) as recorder:
        student_hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d)
    n = ids.shape[1] if length is None else length
    log_betas = [lb[:, :n] for lb in recorder.log_betas]  # (B, n, H_kv) per layer
    kl, ntp = distillation_losses(student_hidden[:, :n], teacher_hidden[:, :n], ids[:, :n],
                                  model.get_output_embeddings(), logit_block)
    parts = {"kl": kl, "ntp": ntp, "capacity": capacity_loss(log_betas, memory_size, capacity_form)}
    beta_mean = torch.stack([lb.detach().exp().mean() for lb in log_betas]).mean()
    return {"loss": total_loss(parts, weights), **parts, "beta_mean": beta_mean}


class GateRecorder:
    """Inside `with GateRecorder(model) as r:`, r.log_betas collects every gate's output (B, T, H_kv) in layer
    order. The hooks are gone after the block, so recomputation in the backward pass records nothing."""

    def __init__(self, model):
        from trimkv.gates import gates

        self.gates = gates(model)
        self.log_betas: list[Tensor] = []
        self._handles = []

    def __enter__(self):
        self._handles = [g.register_forward_hook(lambda m, a, out: self.log_betas.append(out)) for g in self.gates]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """The attention function every layer calls (transformers reads config._attn_implementation per call)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous
