"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the first few tokens (attention sinks) and the most recent ones.

The paper finds that softmax attention dumps a large share of its weight on the first tokens of a
sequence whatever they say; evicting them breaks a sliding-window cache, keeping them repairs it.
The rule, per (sequence, layer, KV head):

    score_i = +inf   if i < sink
    score_i = i      otherwise (recency: the newest tokens win)

so the top-M are the `sink` first tokens plus the M - sink most recent. The authors used 4 sink
tokens (the default here) with the rest of the budget as a recent window.

Differences from the paper: keys are cached after RoPE, so kept tokens keep their original
positions (the paper re-assigns positions inside the cache); and the cache compresses when it holds
M + buffer tokens, so between compressions up to `buffer_size` extra recent tokens are attended.

`make_cache("streaming", sink=k)` sets this field (a policy with its own `sink` takes the keyword
instead of the cache's generic option). Keep sink <= memory_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy


@dataclass
class StreamingLLM(Policy):
    name = "streaming"

    sink: int = 4  # first tokens always kept; the paper's default

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")

    def score(self, view: CacheView) -> torch.Tensor:
        recency = view.positions.float()  # (B, H, N)
        return recency.masked_fill(view.positions < self.sink, math.inf)
