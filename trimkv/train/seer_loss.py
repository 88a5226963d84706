"""The SeerAttention-R training objective (Gao et al., 2025, arXiv 2506.08889): self-distillation of the AttnGate
(trimkv/seer.py) from the frozen base model's block-pooled attention.

Target. For layer l, KV head h with query heads g in its group G(h), the frozen model's causal attention
A^g[i, t] = softmax_t(q_i^g . k_t * scaling) over t <= i is pooled per key block of b tokens,

    P[i, j] = max_{g in G(h)} max_{t in block j, t <= i} A^g[i, t]                           (block-pooled attention)

kept on the blocks before the query's own, j < i // b (the block being written is always read at decode), and
normalised over them: p_i = P[i, :c_i] / sum_j P[i, j], c_i = i // b.

Loss, with s_ij the gate's logits and q_i = softmax_{j < c_i}(s_ij), per layer over the rows i that have earlier
blocks (i >= b) and lie in the last (1 - slice) of the sequence (i >= slice * n):

    KL_l = mean_{b, h, i} sum_j p_ij (log p_ij - log q_ij),          L = mean_l KL_l

Released code (modeling_*_seerattn_training.py, distillation_decode.py): the same target (max-pooled attention
probabilities, max over the group, earlier blocks only, renormalised; computed by a fused kernel alongside the
attention); torch's KLDivLoss(reduction="mean"), i.e. divided by every (head, row, block) element, summed over
layers and multiplied by gate_loss_scale = 10; loss_slice_ratio 0.5 in the training script. Ours: KL per row (a sum
over blocks) averaged over rows, heads and layers, so its value does not depend on the number of blocks or layers.
Released recipe: OpenR1-Math-220k, 32K-token sequences, 800 steps of batch 16, AdamW lr 1e-3 without weight decay,
20 warmup steps then cosine to 1e-5.

One forward per sequence: the base model runs with the attention implementation `trimkv_seer` (stock SDPA; while a
`GateRecorder` is active it also computes the layer's target without grad and the gate's logits with grad, from the
queries and keys the layer attends with, RoPE undone); only the gates build an autograd graph. The target is
computed a block of query rows at a time, so no T x T tensor per head exists at long lengths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trimkv.gates import AttentionRecorder
from trimkv.seer import attn_gates, unrotate

LOSS_SLICE = 0.5  # released training script: the loss covers the second half of each sequence
IMPLEMENTATION = "trimkv_seer"
RECORDER_ATTR = "_trimkv_seer_recorder"


def block_attention(query: Tensor, key: Tensor, scaling: float, block_size: int, block_elements: int = 1 << 24
                    ) -> Tensor:
    """Normalised block-pooled attention p (B, H_kv, T, n_blocks) float32, n_blocks = ceil(T / b).

    query (B, H_q, T, D), key (B, H_kv, T, D) of one causal sequence, after RoPE. Row i is zero outside the blocks
    j < i // b, and all zero when there are none (i < b). Queries are taken C at a time, C * T * B * H_q <=
    block_elements (at least one).
    """
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    b = block_size
    n_blocks = math.ceil(T / b)
    q = query.float().view(B, Hkv, Hq // Hkv, T, D)  # query head g of KV head h is h * G + g (repeat_kv order)
    k = key.float().unsqueeze(2)
    out = torch.zeros(B, Hkv, T, n_blocks, device=query.device)
    rows = max(1, block_elements // max(B * Hq * T, 1))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        logits = scaling * q[:, :, :, t0:t1] @ k[..., :t1, :].transpose(-1, -2)  # (B, Hkv, G, C, t1)
        i = torch.arange(t0, t1, device=query.device)[:, None]
        t = torch.arange(t1, device=query.device)[None, :]
        probs = torch.softmax(logits.masked_fill(t > i, float("-inf")), dim=-1).amax(dim=2)  # (B, Hkv, C, t1)
        pad = math.ceil(t1 / b) * b - t1
        pooled = torch.nn.functional.pad(probs, (0, pad)).view(B, Hkv, t1 - t0, -1, b).amax(-1)
        out[:, :, t0:t1, : pooled.shape[-1]] = pooled
    earlier = torch.arange(n_blocks, device=query.device)[None, :] < (torch.arange(T, device=query.device) // b)[:, None]
    out = out * earlier
    return out / out.sum(-1, keepdim=True).clamp(min=1e-30)


def gate_kl(logits: Tensor, target: Tensor, block_size: int, first: int = 0) -> tuple[Tensor, int]:
    """(sum over rows of KL(p_i || softmax of the gate's logits over blocks j < i // b), number of rows).

    logits, target (B, H_kv, T, n_blocks); rows i >= max(first, b) count (each has at least one earlier block).
    """
    B, H, T, n_blocks = logits.shape
    start = max(first, block_size)
    if start >= T:
        return logits.sum() * 0.0, 0
    i = torch.arange(start, T, device=logits.device)
    earlier = torch.arange(n_blocks, device=logits.device)[None, :] < (i // block_size)[:, None]  # (R, n)
    log_q = torch.log_softmax(logits[:, :, start:].float().masked_fill(~earlier, -math.inf), dim=-1)
    p = target[:, :, start:].float()
    terms = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - log_q), 0.0)  # 0 log 0 = 0; blocks out of reach: p = 0
    return terms.sum(), B * H * (T - start)


class GateRecorder(AttentionRecorder):
    """Inside `with GateRecorder(model, first) as r:`, every forward with the `trimkv_seer` attention appends each
    layer's (KL sum, rows) to r.kl and the target's mean entropy to r.entropy, in layer order."""

    attr = RECORDER_ATTR

    def __init__(self, model, first: int = 0):
        attn_gates(model)  # a clear error when there are none
        super().__init__(model)
        self.first = first
        self.kl: list[tuple[Tensor, int]] = []
        self.entropy: list[Tensor] = []


def objective(model, ids: Tensor, loss_slice: float = LOSS_SLICE, length: int | None = None) -> dict[str, Tensor]:
    """The SeerAttention-R loss on one batch of unpadded sequences ids (B, T): {"loss", "target_entropy"}.

    One forward of the decoder (no lm_head) with the `trimkv_seer` attention; length: use the first `length` tokens
    only (the rest is padding). loss = mean over layers of the mean per-row KL; target_entropy (mean entropy of the
    target rows, nats) is for logging: loss + target_entropy is the gate's cross-entropy.
    """
    if not 0 <= loss_slice < 1:
        raise ValueError(f"loss_slice must be in [0, 1), got {loss_slice}")
    n = ids.shape[1] if length is None else length
    previous = model.config._attn_implementation
    model.config._attn_implementation = IMPLEMENTATION
    try:
        with GateRecorder(model, first=int(loss_slice * n)) as recorder:
            model.model(input_ids=ids[:, :n], use_cache=False)
    finally:
        model.config._attn_implementation = previous
    rows = sum(r for _, r in recorder.kl)
    if rows == 0:
        block = attn_gates(model)[0].config.block_size
        raise ValueError(f"SeerAttention-R training needs sequences longer than the block size {block} (and than "
                         f"the loss slice), got {n} tokens")
    kl = torch.stack([s / r for s, r in recorder.kl]).mean()
    return {"loss": kl, "target_entropy": torch.stack(recorder.entropy).mean()}


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Stock SDPA; while a GateRecorder is active, also the layer's gate loss (target without grad)."""
    recorder = getattr(module, RECORDER_ATTR, None)
    if recorder is not None:
        if key.shape[2] != query.shape[2]:
            raise ValueError("SeerAttention-R targets need one whole sequence per forward (use_cache=False, no cache)")
        if kwargs.get("sliding_window"):
            raise ValueError("SeerAttention-R targets assume full causal attention; this layer uses a sliding window")
        gate = module.attn_gate
        b = gate.config.block_size
        B, _, T, _ = query.shape
        with torch.no_grad():
            target = block_attention(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5, b)
            positions = torch.arange(T, device=query.device).expand(B, T)
            q_nope, k_nope = unrotate(module, query, positions), unrotate(module, key, positions)
            k_nope = torch.nn.functional.pad(k_nope, (0, 0, 0, target.shape[-1] * b - T))  # the last block whole
        logits = gate.logits(q_nope, positions, k_nope, target.shape[-1])
        recorder.kl.append(gate_kl(logits, target, b, recorder.first))
        start = max(recorder.first, b)
        p = target[:, :, start:]
        recorder.entropy.append(-(p * p.clamp(min=1e-30).log()).sum(-1).mean() if start < T else p.sum())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
