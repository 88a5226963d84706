"""The LocRet training objective (Huang et al., 2024, arXiv 2410.01805): retaining heads regress the causal
importance of every token, the base model frozen.

Target. For layer l, KV head h with query heads g in its group G(h) (GQA), the frozen model's attention
A^g[i, j] = softmax_j(q_i^g . k_j * scaling) over causal keys j <= i gives each token j the score

    s_j = max_{i > j} max_{g in G(h)} A^g[i, j]                      (causal importance score, CIS)

the most attention any later query pays it. Paper: the CIS is the max over later queries and over the group's
query heads. Released code (locret/train/data_gen.py): queries are the response tokens of a prompt/response pair
and keys the prompt's; our training sequences carry no such split, so every strictly later token of the sequence
queries (ours); the last token has no later query and no target. A query block at a time (`causal_importance`),
so no T x T tensor per head exists at long lengths.

Loss, with s_hat the heads' predictions (both float32, per layer (B, T, H_kv)), over tokens j < n - 1:

    L = mean_{l, b, j, h} SmoothL1(s_hat, s)  +  alpha * sum_l mean_{b, j, h} (s_hat_{j+1} - s_hat_j)^2

SmoothL1 with beta = 1 and alpha = 0.0025 (paper and released locret/train/train.py); the smoothness term summed
over layers, each a mean over adjacent pairs, as in the released code.

Released training recipe, for the pipeline's options: LongAlpaca, 3000 steps, sequences up to 10240 tokens,
batch 1, AdamW lr 5e-4 betas (0.9, 0.95), 2000 linear warmup steps then linear decay, gradient values clipped
at 0.5. Our trainer keeps its AdamW + warmup + cosine and norm clipping (trainer.py); set --lr to taste.

One forward per sequence: the base model runs with the attention implementation `trimkv_locret` (stock SDPA
whose inputs are also used to compute the targets, without grad), while the retaining heads (trimkv/locret.py)
record their predictions from the same pass; only the heads build an autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trimkv.locret import RECORDER_ATTR, ScoreRecorder

SMOOTHNESS_WEIGHT = 0.0025  # alpha, paper and released code
SMOOTH_L1_BETA = 1.0  # torch's default, as nn.SmoothL1Loss() in the released code
LOSS_PARTS = ("cis", "smoothness")
IMPLEMENTATION = "trimkv_locret"  # the attention implementation that records the targets


def causal_importance(query: Tensor, key: Tensor, scaling: float, block_elements: int = 1 << 24) -> Tensor:
    """CIS of every key: query (B, H_q, T, D), key (B, H_kv, T, D) of one causal sequence -> (B, T, H_kv) float32.

    Queries are taken C at a time, with C * T * B * H_q <= block_elements (at least one), against the keys they
    can see; only strictly later queries (i > j) count. The last token gets 0 (no later query).
    """
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    q = query.float().view(B, Hkv, Hq // Hkv, T, D)  # query head g of KV head h is h * G + g (repeat_kv order)
    k = key.float().unsqueeze(2)  # (B, Hkv, 1, T, D)
    cis = torch.zeros(B, Hkv, T, device=query.device)
    rows = max(1, block_elements // max(B * Hq * T, 1))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        logits = scaling * q[:, :, :, t0:t1] @ k[..., :t1, :].transpose(-1, -2)  # (B, Hkv, G, C, t1)
        i = torch.arange(t0, t1, device=query.device)[:, None]  # (C, 1)
        j = torch.arange(t1, device=query.device)[None, :]  # (1, t1)
        probs = torch.softmax(logits.masked_fill(j > i, float("-inf")), dim=-1)
        probs = probs.masked_fill(j >= i, 0.0)  # a query's own token and later keys: not "received later"
        cis[..., :t1] = torch.maximum(cis[..., :t1], probs.amax(dim=(2, 3)))
    return cis.transpose(1, 2)


def locret_loss(predictions: list[Tensor], targets: list[Tensor], smoothness_weight: float = SMOOTHNESS_WEIGHT
                ) -> dict[str, Tensor]:
    """{"loss", "cis", "smoothness"} from per-layer predictions and targets, each (B, n, H_kv).

    cis: mean SmoothL1 over layers, rows, tokens j < n - 1 and heads; smoothness: sum over layers of the mean
    squared difference of adjacent predictions among those tokens; loss = cis + smoothness_weight * smoothness.
    """
    if len(predictions) != len(targets) or not predictions:
        raise ValueError(f"need one target per prediction, got {len(predictions)} predictions, {len(targets)} targets")
    n = predictions[0].shape[1]
    if n < 2:
        raise ValueError("LocRet training needs sequences of at least 2 tokens (the last has no later query)")
    cis = smooth = torch.zeros((), device=predictions[0].device)
    for pred, target in zip(predictions, targets):
        pred, target = pred[:, : n - 1].float(), target[:, : n - 1].float()
        cis = cis + F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA)
        if n > 2:
            smooth = smooth + (pred[:, 1:] - pred[:, :-1]).pow(2).mean()
    cis = cis / len(predictions)  # every layer has the same number of entries: the mean over all of them
    return {"loss": cis + smoothness_weight * smooth, "cis": cis, "smoothness": smooth}


def objective(model, ids: Tensor, smoothness_weight: float = SMOOTHNESS_WEIGHT, length: int | None = None
              ) -> dict[str, Tensor]:
    """The LocRet loss on one batch of unpadded sequences ids (B, T): {"loss", "cis", "smoothness", "cis_mean"}.

    One forward of the decoder (no lm_head) with the `trimkv_locret` attention; length: use the first `length`
    tokens only. cis_mean (the targets' mean) is for logging.
    """
    previous = model.config._attn_implementation
    model.config._attn_implementation = IMPLEMENTATION
    try:
        with ScoreRecorder(model) as recorder:
            model.model(input_ids=ids, use_cache=False)
    finally:
        model.config._attn_implementation = previous
    n = ids.shape[1] if length is None else length
    predictions = [p[:, :n] for p in recorder.predictions]
    targets = [t[:, :n] for t in recorder.targets]
    parts = locret_loss(predictions, targets, smoothness_weight)
    parts["cis_mean"] = torch.stack([t[:, : n - 1].mean() for t in targets]).mean()
    return parts


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Stock SDPA; while a ScoreRecorder is active, also the layer's CIS targets (no grad)."""
    recorder = getattr(module, RECORDER_ATTR, None)
    if recorder is not None:
        if key.shape[2] != query.shape[2]:
            raise ValueError("LocRet targets need one whole sequence per forward (use_cache=False, no cache)")
        if kwargs.get("sliding_window"):
            raise ValueError("LocRet targets assume full causal attention; this layer uses a sliding window")
        with torch.no_grad():
            recorder.targets.append(causal_importance(query, key, kwargs.get("scaling") or query.shape[-1] ** -0.5))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
