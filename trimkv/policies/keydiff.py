"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments", arXiv 2504.15364): keep the keys that differ most
from the rest.

Tokens whose keys point the same way as most others are redundant; distinctive keys are kept. Per
(sequence, layer, KV head), with the anchor the mean direction of the candidate keys:

    a       = mean_j  k_j / ||k_j||               (over the valid candidates j only)
    score_i = -cos(k_i, a)

The paper evicts block by block as the prompt streams in, with no hyperparameter besides the
budget; here the cache's buffer plays the block's role (compress at M + buffer, back to M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimkv.policies.base import CacheView, Policy


@dataclass
class KeyDiff(Policy):
    name = "keydiff"

    def score(self, view: CacheView) -> torch.Tensor:
        unit = F.normalize(view.keys.float(), dim=-1)  # (B, H, N, D)
        valid = view.valid.unsqueeze(-1)  # (B, 1, N, 1): empty slots hold stale keys, leave them out
        count = view.valid.sum(-1, keepdim=True).clamp(min=1).unsqueeze(-1)  # (B, 1, 1, 1)
        anchor = (unit * valid).sum(2, keepdim=True) / count  # (B, H, 1, D)
        return -F.cosine_similarity(unit, anchor, dim=-1)  # (B, H, N)
