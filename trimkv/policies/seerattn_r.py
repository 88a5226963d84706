"""SeerAttention-R (Gao et al., 2025, "SeerAttention-R: Sparse Attention Adaptation for Long Reasoning",
arXiv 2506.08889): at each decode step attention reads only the key blocks a trained gate picks; nothing is evicted.

Keys are cut into blocks of b tokens (the gate's block size, released default 64). At a decode step of the token at
position t, with c = t // b its block, each (sequence, layer, KV head) reads

    block c  +  the top n = M // b blocks j < c by the AttnGate's logit s_tj      (trimkv/seer.py)

and the query heads of a group share their KV head's choice. Every block is read while t // b <= n, so a budget M at
least the sequence length gives exactly the full cache. Prefill is dense, as in the released code.

The budget M bounds what a step *reads*, not what the cache *stores*: the full cache stays in memory (this method
saves bandwidth, not memory), so reported cache bytes are the full cache's.

Differences from the released code (ours): released takes the top-n over all blocks including the one being written
(whose pooled key is zero) and then adds it, so it reads n or n + 1 blocks; we always read n earlier blocks plus
the current one. Its optional threshold selection and sliding window are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy


@dataclass
class SeerAttnR(Policy):
    name = "seerattn_r"
    stores_all = True
    learned = "attn_gate"

    def score(self, view: CacheView) -> torch.Tensor:
        return view.positions.float()  # never called: nothing is evicted

    def select(self, module, query, key, query_positions, budget):
        from trimkv.seer import decode_selection

        return decode_selection(module, query, key, query_positions, budget)
