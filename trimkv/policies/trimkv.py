"""TRIM-KV (Bui et al., 2025, arXiv 2512.03324): keep the tokens with the highest retention.

A token i cached at step t has retention beta_i^(t - i), beta_i from the layer's learned gate. Each
(sequence, layer, KV head) keeps the top-M tokens by

    score_i = (t - i) * log beta_i                      (plain)
    score_i = (t - i) * log beta_i + log ||k_i||        (knorm=True, the released "knorm_alpha" variant)

with t = tokens seen + 1 at compression time, as in the released code. Sink and window options of
the cache force the first / last tokens in regardless of score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy


@dataclass
class TrimKV(Policy):
    name = "trimkv"
    needs = ("log_beta",)
    learned = "retention_gate"

    knorm: bool = False

    def score(self, view: CacheView) -> torch.Tensor:
        age = (view.t - view.positions).float()  # (B, H, N)
        score = age * view.extras["log_beta"]
        if self.knorm:
            score = score + view.keys.float().norm(dim=-1).log()
        return score
