"""Attention-based policies (h2o, tova, snapkv, rkv) on hand-made caches whose kept set is known."""

from __future__ import annotations

import math

import torch

from trimkv.policies.base import CacheView, attention_probs
from trimkv.policies.h2o import H2O
from trimkv.policies.rkv import RKV, redundancy
from trimkv.policies.snapkv import SnapKV
from trimkv.policies.tova import TOVA

D = 4


def unit(i: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(D)
    v[i % D] = scale
    return v


def view(keys: list[torch.Tensor], queries: list[torch.Tensor] | None = None, query_positions=None,
         memory_size=2, extras=None) -> CacheView:
    """B=1, one KV head and one query head; keys at positions 0..N-1, seen = N."""
    N = len(keys)
    k = torch.stack(keys)[None, None]  # (1, 1, N, D)
    positions = torch.arange(N)[None, None]
    q = torch.stack(queries)[None, None] if queries else None
    qp = torch.tensor([query_positions]) if query_positions is not None else None
    return CacheView(k, torch.zeros_like(k), positions, extras or {}, torch.tensor([[[N + 1]]]),
                     torch.ones(1, 1, N, dtype=torch.bool), memory_size, q, qp, scaling=1.0)


def kept(policy, v: CacheView) -> list[int]:
    """The cache's selection rule: top-M of the score, in position order."""
    order = policy.score(v)[0, 0].sort(descending=True, stable=True).indices
    return sorted(order[: v.memory_size].tolist())


def test_attention_probs_are_causal_and_skip_empty_queries():
    v = view([unit(0), unit(1), unit(2)], [unit(2, 5.0), unit(1, 5.0)], query_positions=[1, -1])
    p = attention_probs(v, v.queries, v.query_positions)[0, 0, 0]  # (W, N)
    assert p[0, 2] == 0 and torch.isclose(p[0, :2].sum(), torch.tensor(1.0))  # query at 1 cannot see key 2
    assert (p[1] == 0).all()  # an empty query slot contributes nothing


def test_tova_keeps_what_the_last_query_attends_to():
    keys = [unit(0), unit(1), unit(2), unit(3), unit(1, -1.0), unit(2, 0.5)]
    q = unit(1, 3.0) + unit(3, 2.0)  # likes key 1 most, then key 3
    v = view(keys, [unit(0), q], query_positions=[4, 6])
    assert kept(TOVA(), v) == [1, 3]


def test_h2o_accumulates_attention_over_all_queries_and_keeps_recent():
    keys = [unit(0), unit(1), unit(2), unit(3), unit(0, 0.1), unit(1, 0.1)]
    state = {"attention_sum": torch.zeros(1, 1, 6)}
    v = view(keys, memory_size=4, extras=state)
    policy = H2O(recent_ratio=0.5, query_chunk=1)  # chunk 1: the sums must not depend on chunking
    queries = torch.stack([unit(2, 6.0), unit(2, 6.0), unit(0, 6.0)])[None, None]
    policy.observe(v, queries, torch.tensor([[5, 5, 5]]))
    expected = sum(torch.softmax(keys_t @ q, 0) for q in queries[0, 0] for keys_t in [torch.stack(keys)])
    torch.testing.assert_close(state["attention_sum"][0, 0], expected)
    # Heavy hitters 2 (two queries) and 0 (one), plus the recent half of the budget: positions 4, 5.
    assert kept(policy, v) == [0, 2, 4, 5]


def test_snapkv_pools_window_votes_to_neighbours_and_keeps_the_window():
    keys = [unit(0), unit(1), unit(2), unit(3), unit(0, 0.2), unit(1, 0.2), unit(2, 0.2), unit(3, 0.2)]
    window = [unit(3, 8.0), unit(3, 8.0)]  # both vote for key 3
    v = view(keys, window, query_positions=[6, 7], memory_size=5)
    policy = SnapKV(query_window=2, kernel_size=3)
    # Window (positions 6, 7) forced; key 3 votes strongly, max pooling (kernel 3) lifts 2 and 4 too.
    assert kept(policy, v) == [2, 3, 4, 6, 7]
    no_pool = SnapKV(query_window=2, kernel_size=1)
    assert 3 in kept(no_pool, v) and 2 not in kept(no_pool, v)


def test_rkv_redundancy_penalizes_duplicated_keys():
    a, b, c = unit(0), unit(1), unit(2)
    keys = [a, a.clone(), a.clone(), b, c]
    v = view(keys, [unit(3), unit(3)], query_positions=[3, 4], memory_size=3)
    r = redundancy(v, threshold=0.5)[0, 0]
    assert torch.isclose(r.sum(), torch.tensor(1.0))
    # By hand: copies 0, 1, 2 are similar to each other; each row exempts its most recent similar copy,
    # so column sums of cos are 2, 1, 0 for the copies and 0 for b and c: the latest copy counts as new.
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0]) / 5, dim=0)
    torch.testing.assert_close(r, expected)
    # Pure redundancy (lambda 0), window of 1: the two older copies of `a` go.
    assert kept(RKV(query_window=1, mix_lambda=0.0), v) == [2, 3, 4]


def test_rkv_lambda_one_is_pooled_importance():
    keys = [unit(0), unit(1), unit(2), unit(3), unit(0, 0.1)]
    v = view(keys, [unit(1, 9.0)], query_positions=[4], memory_size=2)
    policy = RKV(query_window=1, kernel_size=1, mix_lambda=1.0)
    assert kept(policy, v) == [1, 4]  # the key attended to, and the forced window
    assert math.isinf(policy.score(v)[0, 0, 4])
