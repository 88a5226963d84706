"""LocRet (Huang et al., 2024, "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining
Heads", arXiv 2410.01805): keep the tokens the trained retaining heads predict will matter, plus the newest ones.

Each token's score is fixed when it enters the cache: the retaining head of its layer (trimkv/locret.py) maps the
token's [Q; K; V] to a predicted causal importance per KV head, and the cache stages it as "locret_score". Per
(sequence, layer, KV head):

    score_i = s_hat_i                    (the head's prediction for token i)
    score_i = +inf   if i is among the last n_local tokens seen

so the cache keeps the n_local most recent tokens and the top M - n_local of the rest by predicted importance.
The paper runs chunked prefill (`make_cache(..., prefill_chunk=...)`: released code 3072 tokens) and evicts to the
budget after every chunk, always keeping its "stabilizers", the newest cached tokens (released inference defaults:
budget 6000, 2500 stabilizers). n_local=None (default) keeps that proportion: round(2500 / 6000 * M) tokens;
an integer sets it directly (clamped to M).

Differences from the released code (ours): the window is also forced at the last prefill chunk and during decoding
(released: the last chunk is not forced, and decoding never evicts), and the cache compresses once it holds
M + buffer_size tokens, so up to buffer_size extra recent tokens are attended between compressions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy
from trimkv.policies.snapkv import keep_window

LOCAL_FRACTION = 2500 / 6000  # released inference defaults: stabilizers / budget


@dataclass
class Locret(Policy):
    name = "locret"
    needs = ("locret_score",)
    learned = "retaining_head"

    n_local: int | None = None

    def __post_init__(self):
        if self.n_local is not None and self.n_local < 0:
            raise ValueError(f"n_local must be >= 0 or None, got {self.n_local}")

    def local_window(self, memory_size: int) -> int:
        """Recent tokens always kept at budget M."""
        n = round(LOCAL_FRACTION * memory_size) if self.n_local is None else self.n_local
        return min(n, memory_size)

    def score(self, view: CacheView) -> torch.Tensor:
        return keep_window(view.extras["locret_score"], view, self.local_window(view.memory_size))
