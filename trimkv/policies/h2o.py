"""H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

Keep the "heavy hitters" — tokens that have received the most attention so far — plus the most
recent tokens. Each cached token accumulates the attention every later query paid it:

    score_i = sum_{queries t >= i} softmax_t(q_t . k_j / sqrt(d))_i      (summed over the KV head's query heads)

and the last `recent_ratio * M` tokens are always kept (the paper splits the budget half heavy,
half recent: recent_ratio 0.5). Unlike the approximation in R-KV's code (attention of the last query
only), the sums run over every query, prefill included, in chunks of `query_chunk` so a long prompt
never materializes a T x T attention matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy, attention_probs


@dataclass
class H2O(Policy):
    name = "h2o"
    state = ("attention_sum",)

    recent_ratio: float = 0.5
    query_chunk: int = 256

    def observe(self, view: CacheView, queries: torch.Tensor, query_positions: torch.Tensor) -> None:
        total = view.extras["attention_sum"]
        for start in range(0, queries.shape[2], self.query_chunk):
            stop = start + self.query_chunk
            probs = attention_probs(view, queries[:, :, start:stop], query_positions[:, start:stop])
            total += probs.sum(dim=(2, 3))  # over query heads of the group and queries -> (B, H_kv, N)

    def score(self, view: CacheView) -> torch.Tensor:
        recent = math.floor(self.recent_ratio * view.memory_size)
        seen = view.t - 1  # (B, 1, 1)
        return view.extras["attention_sum"].masked_fill(view.positions >= seen - recent, math.inf)
