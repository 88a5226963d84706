"""Key norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv 2406.11430): keep the tokens whose keys have the lowest L2 norm.

The paper observes, across most layers, that a key with a low L2 norm usually receives high
attention during decoding, so the norm predicts importance without looking at any query:

    score_i = -||k_i||_2                (keys after RoPE, as cached; RoPE preserves the norm)

No hyperparameters besides the budget. Being query-free, it works with any attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy


@dataclass
class KNorm(Policy):
    name = "knorm"

    def score(self, view: CacheView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)  # (B, H, N)
