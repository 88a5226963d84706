"""TOVA, Token Omission Via Attention (Oren et al., 2024, arXiv 2401.06104).

When the cache is full, drop the tokens the current query attends to least. The attention is averaged
over all query heads of the layer, so every head keeps the same tokens, as in the paper:

    score_i = mean_h softmax(q_t^h . k_i^h / sqrt(d))_i,       t = the most recent query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy, attention_probs


@dataclass
class TOVA(Policy):
    name = "tova"
    query_window: int = 1

    def score(self, view: CacheView) -> torch.Tensor:
        probs = attention_probs(view, view.queries[:, :, -1:], view.query_positions[:, -1:])  # (B, Hkv, G, 1, N)
        per_layer = probs.mean(dim=(1, 2, 3))  # (B, N): all heads of the layer
        return per_layer[:, None, :].expand_as(view.positions)
