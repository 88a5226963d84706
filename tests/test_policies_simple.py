"""The baseline policies (streaming, keydiff, knorm, random): hand-made cases, then stock generate."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from conftest import tiny_model
from test_cache import generate, left_padded

import trimkv
from trimkv.policies import CacheView, get_policy

B, H, N, D = 2, 2, 8, 4
E = torch.eye(D)  # E[j]: unit vector along axis j


def view(keys, positions=None, counts=(N, N)):
    """A CacheView over (B, H, N, D) keys; row b has its first counts[b] slots valid."""
    if positions is None:
        positions = torch.arange(N).expand(B, H, N)
    valid = torch.arange(N)[None, None, :] < torch.tensor(counts)[:, None, None]  # (B, 1, N)
    t = (positions.amax(dim=(1, 2)) + 2).view(B, 1, 1)
    return CacheView(keys.float(), torch.zeros_like(keys).float(), positions, {}, t, valid)


def kept_slots(policy, v, M):
    """The cache's selection: top-M score per (row, head), empty slots never chosen, in slot order."""
    scores = policy.score(v).float().masked_fill(~v.valid, -math.inf)
    assert scores.shape == v.positions.shape
    return scores.topk(M, dim=-1).indices.sort(dim=-1).values.tolist()


def test_every_policy_is_registered_by_name():
    assert {"trimkv", "full", "streaming", "keydiff", "knorm", "random"} <= set(trimkv.POLICIES)
    for name in ("streaming", "keydiff", "knorm", "random"):
        policy = get_policy(name)
        assert policy.name == name and policy.bounded and policy.needs == ()
        module = sys.modules[type(policy).__module__]
        assert name == "random" or "arXiv" in module.__doc__, f"{name}: formula and source in the docstring"


# ---- streaming ----

def test_streaming_keeps_sinks_and_most_recent():
    # Row 0: positions 0..7. Row 1: an already-evicted row (positions jump), 6 valid slots; its two
    # empty slots carry large stale positions that recency would otherwise pick.
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 9, 12, 99, 99]]).view(B, 1, N).expand(B, H, N)
    v = view(torch.randn(B, H, N, D), positions, counts=(8, 6))
    assert kept_slots(get_policy("streaming"), v, 5) == [[[0, 1, 2, 3, 7]] * H, [[0, 1, 2, 3, 5]] * H]
    assert kept_slots(get_policy("streaming", sink=2), v, 5) == [[[0, 1, 5, 6, 7]] * H, [[0, 1, 3, 4, 5]] * H]
    assert kept_slots(get_policy("streaming", sink=0), v, 3) == [[[5, 6, 7]] * H, [[3, 4, 5]] * H]
    with pytest.raises(ValueError, match="sink must be >= 0"):
        get_policy("streaming", sink=-1)


# ---- keydiff ----

def test_keydiff_keeps_the_outlier_keys():
    keys = torch.zeros(B, H, N, D)
    # Row 0, head 0: seven keys near e0 (different lengths: only direction counts), one along e1 at slot 3.
    keys[0, 0] = E[0] * torch.arange(1, N + 1).float()[:, None] + 0.01 * E[2]
    keys[0, 0, 3] = 0.5 * E[1]
    # Row 0, head 1: slots 0-5 along e2, slot 6 along e3, slot 7 along -e2 (the most distinct of all).
    keys[0, 1] = E[2]
    keys[0, 1, 6], keys[0, 1, 7] = E[3], -E[2]
    # Row 1, 6 valid slots: directions e0 x1, e1 x2, e2 x3 -> anchor ~ (1, 2, 3)/6: e0 is the rarest.
    # The two empty slots hold stale e0 keys; counted in the anchor they would make e1 the rarest.
    keys[1, :, :6] = torch.stack([E[0], E[1], E[1], E[2], E[2], E[2]])
    keys[1, :, 6:] = E[0]
    v = view(keys, counts=(8, 6))
    policy = get_policy("keydiff")
    assert kept_slots(policy, v, 1) == [[[3], [7]], [[0], [0]]]
    assert kept_slots(policy, v, 2)[0][1] == [6, 7]  # anchor ~ (5 e2 + e3) / 8: -e2, then e3
    assert kept_slots(policy, v, 3)[1] == [[0, 1, 2], [0, 1, 2]]  # e0, then both e1
    # Scaling a key never changes its score; the score is -cos(k_i, anchor), in [-1, 1].
    scaled = view(keys * torch.rand(B, H, N, 1).add(0.5), counts=(8, 6))
    torch.testing.assert_close(policy.score(scaled), policy.score(v))
    assert policy.score(v).abs().max() <= 1 + 1e-6


# ---- knorm ----

def test_knorm_keeps_the_lowest_key_norms():
    norms = torch.tensor([
        [[3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0], [0.5, 8.0, 7.0, 0.6, 9.0, 0.7, 5.0, 4.0]],
        [[2.0, 3.0, 1.0, 4.0, 5.0, 6.0, 0.1, 0.1], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.1, 0.1]],
    ])  # row 1: the 0.1 norms sit in empty slots and must not be kept
    directions = torch.nn.functional.normalize(torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(0)),
                                               dim=-1)
    v = view(directions * norms[..., None], counts=(8, 6))
    assert kept_slots(get_policy("knorm"), v, 3) == [[[1, 3, 6], [0, 3, 5]], [[0, 1, 2], [3, 4, 5]]]
    torch.testing.assert_close(get_policy("knorm").score(v), -norms)


# ---- random ----

def test_random_is_seeded_and_depends_only_on_position_layer_and_head():
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 5, 8, 13, 21, 34]]).view(B, 1, N).expand(B, H, N)
    v = view(torch.randn(B, H, N, D), positions)
    a, b = get_policy("random", seed=0).score(v), get_policy("random", seed=0).score(v)
    assert torch.equal(a, b)
    assert not torch.equal(a, get_policy("random", seed=1).score(v))
    assert ((a >= 0) & (a < 1)).all() and not torch.equal(a[:, 0], a[:, 1])  # heads draw independently
    deeper = dataclasses.replace(v, layer=1)
    assert not torch.equal(get_policy("random", seed=0).score(deeper), a)  # and so do layers
    # A row scores the same alone as in any batch, whatever its keys and the other rows hold.
    row = CacheView(torch.randn(1, H, N, D), torch.zeros(1, H, N, D), positions[1:], {},
                    torch.full((1, 1, 1), 36), torch.ones(1, 1, N, dtype=torch.bool))
    assert torch.equal(get_policy("random").score(row)[0], a[1])
    # A position scores the same in every row, whatever slot holds it (position 2: slot 2 vs slot 1).
    assert a[0, :, 0].tolist() == a[1, :, 0].tolist() and a[0, :, 2].tolist() == a[1, :, 1].tolist()
    # The kept set follows the tokens, not the slots: shuffling slots keeps the same positions.
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    shuffled = view(v.keys[:, :, perm], positions[:, :, perm])
    policy = get_policy("random", seed=3)
    kept = [[sorted(positions[r, h, s].item() for s in row) for h, row in enumerate(rows)]
            for r, rows in enumerate(kept_slots(policy, v, 4))]
    kept_shuffled = [[sorted(positions[r, h, perm[s]].item() for s in row) for h, row in enumerate(rows)]
                     for r, rows in enumerate(kept_slots(policy, shuffled, 4))]
    assert kept == kept_shuffled


def test_random_scores_look_uniform():
    positions = torch.arange(4096).expand(1, H, -1)
    s = get_policy("random", seed=5).score(CacheView(None, None, positions, {}, None, None))
    assert abs(s.mean().item() - 0.5) < 0.02 and abs(s.var().item() - 1 / 12) < 0.005
    assert s[0, 0].unique().numel() > 4090  # 24-bit scores: ties are rare


# ---- through stock generate ----

POLICIES = ["streaming", "keydiff", "knorm", "random"]


def baseline_model(family):
    """A tiny hooked model. Qwen3 RMS-normalizes keys; with the init's unit k_norm weights every key has
    norm sqrt(head_dim) and knorm would rank float noise, so give k_norm a spread like a trained one."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return trimkv.prepare(model)


def streaming_expected(seen: int, count: int, sink: int) -> list[int]:
    return list(range(sink)) + list(range(seen - (count - sink), seen))


@pytest.mark.parametrize("policy", POLICIES)
def test_padded_batch_rows_generate_what_they_generate_alone(family, policy):
    model = baseline_model(family)
    lengths, new = [13, 5], 8
    ids, mask = left_padded(lengths)
    cache = trimkv.make_cache(policy, memory_size=4, buffer_size=2)
    batch = generate(model, ids, mask, cache, max_new_tokens=new)
    assert int(cache.count.max()) <= 6 and cache.slots == 6
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        alone_cache = trimkv.make_cache(policy, memory_size=4, buffer_size=2)
        alone = generate(model, ids[b:b + 1, T - n:], cache=alone_cache, max_new_tokens=new)
        assert torch.equal(batch[b, T:], alone[0, n:]), f"row {b}"
        if policy in ("streaming", "random"):
            # Position-only scores are exact, so the kept sets match too. Key-based ones can tie: a token
            # that occurs twice has one layer-0 key norm, and the batch of 2 and the batch of 1 break
            # that tie by different float noise (the generated tokens still match).
            for layer in range(len(cache.layers)):
                assert torch.equal(cache.kept_positions(layer)[b, :, :int(cache.count[b])],
                                   alone_cache.kept_positions(layer)[0]), f"row {b} layer {layer}"
        if policy == "streaming":  # the default 4 sinks fill M = 4: only the buffer holds recent tokens
            seen, count = n + new - 1, int(cache.count[b])
            assert (cache.kept_positions(0)[b, :, :count] == torch.tensor(streaming_expected(seen, count, 4))).all()


def test_random_layers_keep_their_own_draws():
    # One prompt pass of 30 tokens into M = 8, buffer 0: each layer keeps the 8 positions its own hash ranks
    # highest among 0..29 (random's score ignores t and the keys), and the layers' draws differ.
    model = trimkv.prepare(tiny_model("llama"))
    ids, _ = left_padded([30])
    cache = trimkv.make_cache("random", memory_size=8, buffer_size=0)
    generate(model, ids, cache=cache, max_new_tokens=1)
    policy = get_policy("random")
    positions = torch.arange(30).expand(1, cache.layers[0].keys.shape[1], 30)
    kept = []
    for layer in range(len(cache.layers)):
        scores = policy.score(CacheView(None, None, positions, {}, None, None, layer=layer))
        expected = scores.topk(8, dim=-1).indices.sort(dim=-1).values
        kept.append(cache.kept_positions(layer)[:, :, :8])
        assert torch.equal(kept[-1], expected), f"layer {layer}"
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_at_length_equals_stock_generate(policy):
    # 28 = the longest row's 17 prompt tokens + 11 fed back; buffer 0: the last pass compresses 28 -> 28.
    model = tiny_model("qwen3")
    ids, mask = left_padded([11, 17, 6])
    stock = generate(model, ids, mask, max_new_tokens=12)
    trimkv.prepare(model)
    cache = trimkv.make_cache(policy, memory_size=28, buffer_size=0)
    out = generate(model, ids, mask, cache, max_new_tokens=12)
    assert torch.equal(out, stock)
    assert cache.count.tolist() == [22, 28, 17]


def test_make_cache_sink_sets_the_streaming_sinks():
    # make_cache's `sink` goes to a policy that has its own (streaming), else to the cache; None: defaults.
    model = trimkv.prepare(tiny_model("llama"))
    ids, _ = left_padded([20])
    for cache_sink, expected_sink in [(2, 2), (5, 5), (None, 4)]:
        cache = trimkv.make_cache("streaming", memory_size=7, buffer_size=2, sink=cache_sink)
        generate(model, ids, cache=cache, max_new_tokens=10)
        count = int(cache.count[0])
        for layer in range(len(cache.layers)):
            assert cache.kept_positions(layer)[0].tolist() == [streaming_expected(29, count, expected_sink)] * 2
