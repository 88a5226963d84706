"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469).

The queries of an observation window — the last `window_size` queries — vote for the keys they
attend to; votes are pooled along the sequence so neighbours of important tokens survive too:

    votes_i = mean_{t in window} softmax_t(max_g q_t^g . k_i / sqrt(d))_i      (GQA: max over the group's query heads)
    score_i = maxpool_{kernel}(votes)_i

and the window's own tokens are always kept. Applied at prefill and, as R-KV does for reasoning
models, every time the cache fills during decoding (window 8, kernel 7, max pooling: R-KV's settings;
the SnapKV paper used window 32 at prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimkv.policies.base import CacheView, Policy, attention_logits


def pooled_window_votes(view: CacheView, kernel_size: int, pooling: str) -> torch.Tensor:
    """(B, H_kv, N): window queries' attention (group max of logits, softmax, mean over queries), pooled."""
    logits = attention_logits(view, view.queries, view.query_positions).amax(dim=2)  # (B, Hkv, W, N)
    has_query = view.query_positions >= 0  # (B, W)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    votes = probs.sum(dim=2) / has_query.sum(dim=1).clamp(min=1)[:, None, None]  # (B, Hkv, N)
    B, H, N = votes.shape
    flat = votes.reshape(B * H, 1, N)
    pad = kernel_size // 2
    if pooling == "max":
        flat = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    elif pooling == "avg":
        flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return flat.reshape(B, H, N)


def keep_window(score: torch.Tensor, view: CacheView, window: int) -> torch.Tensor:
    """Force the last `window` tokens in (at most M of them)."""
    window = min(window, view.memory_size)
    return score.masked_fill(view.positions >= view.t - 1 - window, math.inf)


@dataclass
class SnapKV(Policy):
    name = "snapkv"
    query_window: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def score(self, view: CacheView) -> torch.Tensor:
        return keep_window(pooled_window_votes(view, self.kernel_size, self.pooling), view, self.query_window)
