"""What every eviction rule shares: the view of cached tokens it scores, its base class, and the
attention helpers the attention-based rules use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class CacheView:
    """One layer's candidate tokens, laid out along the last token axis N.

    keys, values: (B, H_kv, N, D), keys after RoPE.
    positions:    (B, H_kv, N) original position of each token in its own sequence (padding excluded).
    extras:       per-token signals, each (B, H_kv, N) float32: those the policy `needs` staged by the
                  model hooks (e.g. "log_beta" from the retention gates) and its own `state`.
    t:            (B, 1, 1) the step scores are taken at: tokens seen + 1, as in the released TRIM-KV code.
    valid:        (B, 1, N) bool, False for empty slots (their score is ignored).
    memory_size:  M, the number of tokens kept per head when the cache compresses.
    queries:      (B, H_q, W, D) the layer's most recent real queries (W = policy.query_window), or None.
    query_positions: (B, W) their positions, -1 where a row has seen fewer than W queries.
    scaling:      the attention softmax scale of this layer.
    layer:        the index of the decoder layer.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    extras: dict[str, torch.Tensor]
    t: torch.Tensor
    valid: torch.Tensor
    memory_size: int | None = None
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    scaling: float = 1.0
    layer: int = 0


class Policy:
    """An eviction rule: a score per cached token, higher = keep. Selection lives in the cache.

    Subclasses are small dataclasses:
      name         registry name;
      needs        per-token signals the model hooks must stage ("log_beta");
      state        per-token accumulators the cache stores with each token (zero for new tokens),
                   updated by `observe` after every forward pass (e.g. H2O's attention sums);
      query_window how many of the layer's most recent queries the cache keeps for `score` (0: none);
      bounded      False for a policy that never evicts and takes no budget (full);
      stores_all   True for a policy that takes a budget M but evicts nothing: M limits what attention reads
                   (its `select`), the cache keeps every token (seerattn_r);
      learned      the trained module every attention layer must carry (e.g. "retention_gate"), or None;
      score(view) -> (B, H_kv, N);
      select(...)  which cached keys a layer's attention reads this pass (default: all the mask allows).
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    state: ClassVar[tuple[str, ...]] = ()
    query_window: int = 0
    bounded: ClassVar[bool] = True
    stores_all: ClassVar[bool] = False
    learned: ClassVar[str | None] = None

    def observe(self, view: CacheView, queries: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Update `view.extras[state]` in place from this pass's real queries (B, H_q, q, D), positions (B, q)."""

    def score(self, view: CacheView) -> torch.Tensor:
        raise NotImplementedError

    def select(self, module, query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor,
               budget: int | None) -> torch.Tensor | None:
        """Keys the attention of `module` reads this pass, a bool mask broadcastable to (B, H_q, q, K), or None for
        every key the cache's mask allows. query (B, H_q, q, D), key (B, H_kv, K, D) as attention gets them;
        query_positions (B,): position of each row's first new token; budget: the M the cache was made with."""
        return None


def attention_logits(view: CacheView, queries: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal attention logits of queries over the candidates, (B, H_kv, G, W, N) float32.

    Masked (-inf) where a key is empty or lies after the query; G = H_q // H_kv query heads per KV head.
    """
    B, Hq, W, D = queries.shape
    Hkv = view.keys.shape[1]
    q = queries.float().view(B, Hkv, Hq // Hkv, W, D)
    logits = view.scaling * q @ view.keys.float().unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, W, N)
    visible = view.positions[:, :, None, None, :] <= query_positions[:, None, None, :, None]
    visible &= view.valid[:, :, None, None, :] & (query_positions >= 0)[:, None, None, :, None]
    return logits.masked_fill(~visible, -math.inf)


def attention_probs(view: CacheView, queries: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """softmax of `attention_logits` over the candidates; rows with nothing visible are zero."""
    return torch.softmax(attention_logits(view, queries, query_positions), dim=-1).nan_to_num(0.0)
