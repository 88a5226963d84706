"""The bounded cache under stock `generate`, on tiny random models of every supported family."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import VOCAB, tiny_model

import trimkv
from trimkv.compat import generate_cache_kwarg

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def randomize_gates(model, seed=0):
    """Gates with spread-out retention so eviction is not plain recency and ties do not occur."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trimkv.gates.gate_parameters(model).items():
            scale = 2.0 if name.endswith(".bias") else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def randomize_heads(model, seed=0):
    """LocRet retaining heads with spread-out predictions (no ties)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in trimkv.locret.head_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def randomize_attn_gates(model, seed=0):
    """SeerAttention-R gates with spread-out block logits (no ties)."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in trimkv.seer.gate_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def gated(family, seed=0):
    """Retention gates, LocRet retaining heads and SeerAttention-R gates (blocks of 4), all random: every policy
    finds the signal it needs."""
    model = trimkv.attach_gates(tiny_model(family, seed=seed))
    trimkv.attach_retaining_heads(model, trimkv.LocretConfig(intermediate_size=32))
    trimkv.attach_attn_gates(model, trimkv.SeerConfig(block_size=4, gate_hidden_size=8))
    return randomize_attn_gates(randomize_heads(randomize_gates(model, seed), seed), seed)


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def generate(model, ids, mask=None, cache=None, **kw):
    if cache is not None:
        kw[generate_cache_kwarg(model)] = cache
    return model.generate(ids, attention_mask=mask, **{**GEN, "max_new_tokens": 24, **kw})


@pytest.mark.parametrize("policy", ["trimkv", "full"])
def test_budget_above_length_equals_stock_generate(family, policy):
    model = tiny_model(family)
    ids, mask = left_padded([11, 17, 6])
    stock_batch = generate(model, ids, mask)
    stock_one = generate(model, ids[1:2], mask[1:2])
    randomize_gates(trimkv.attach_gates(model))
    for x, m, stock in [(ids, mask, stock_batch), (ids[1:2], mask[1:2], stock_one)]:
        cache = trimkv.make_cache(policy, memory_size=64, buffer_size=8)
        out = generate(model, x, m, cache)
        assert torch.equal(out, stock)


def test_sampling_with_large_budget_equals_stock_sampling():
    model = tiny_model("qwen3")
    ids, mask = left_padded([9, 13])
    torch.manual_seed(7)
    stock = generate(model, ids, mask, do_sample=True, top_k=0, temperature=1.0)
    randomize_gates(trimkv.attach_gates(model))
    torch.manual_seed(7)
    out = generate(model, ids, mask, trimkv.make_cache("trimkv", memory_size=64), do_sample=True, top_k=0)
    assert torch.equal(out, stock)


def brute_force_kept(log_betas, chunk_lengths, memory_size, buffer_size, sink=0, window=0):
    """Replay eviction for one sequence, one layer: after each forward pass, per head, the kept set.

    log_betas: list over passes of (q, H) tensors recorded from the gate. Written from the definition:
    keep everything until the count reaches M + buffer, then keep the top-M of (t - i) * log beta_i,
    t = tokens seen + 1, first `sink` and last `window` tokens always kept.
    """
    H = log_betas[0].shape[-1]
    kept = [dict() for _ in range(H)]  # head -> {position: log beta}
    seen, history = 0, []
    for lb, q in zip(log_betas, chunk_lengths):
        for h in range(H):
            for j in range(q):
                kept[h][seen + j] = float(lb[j, h])
        seen += q
        t = seen + 1
        for h in range(H):
            if len(kept[h]) >= memory_size + buffer_size:
                def score(i, h=h, seen=seen, t=t):
                    if i < sink or i >= seen - window:
                        return float("inf")
                    return (t - i) * kept[h][i]
                best = sorted(kept[h], key=score, reverse=True)[:memory_size]
                kept[h] = {i: kept[h][i] for i in best}
        history.append([sorted(kept[h]) for h in range(H)])
    return history


@pytest.mark.parametrize("sink,window", [(0, 0), (2, 3)])
def test_kept_positions_equal_brute_force_and_stay_bounded(family, sink, window):
    model = gated(family)
    M, buf = 5, 3
    cache = trimkv.make_cache("trimkv", memory_size=M, buffer_size=buf, sink=sink, window=window)
    layers = trimkv.gates.decoder_layers(model)
    recorded = {i: [] for i in range(len(layers))}
    handles = [layer.self_attn.retention_gate.register_forward_hook(
        lambda mod, a, out, i=i: recorded[i].append(out[0].detach().clone())) for i, layer in enumerate(layers)]
    snapshots = []

    def snapshot(module, args, kwargs, output):
        assert all(layer.keys.shape[2] == M + buf for layer in cache.layers)  # preallocated, never grows
        assert int(cache.count.max()) <= M + buf
        snapshots.append([cache.kept_positions(i)[0].tolist() for i in range(len(layers))])

    handles.append(model.model.register_forward_hook(snapshot, with_kwargs=True))
    ids, _ = left_padded([13])
    generate(model, ids, cache=cache, max_new_tokens=20)
    for h in handles:
        h.remove()
    chunks = [13] + [1] * 19
    assert len(snapshots) == len(chunks)
    for i in range(len(layers)):
        expected = brute_force_kept(recorded[i], chunks, M, buf, sink, window)
        got = [step[i] for step in snapshots]
        assert got == expected, f"layer {i}"
    assert any(p != list(range(p[0], p[0] + len(p))) for p in snapshots[-1][1]), "eviction was only recency"


def test_layer0_log_beta_comes_from_the_gate_on_the_normed_input():
    model = gated("qwen3")
    ids, _ = left_padded([10])
    log_betas = trimkv.retention(model, ids)
    layer0 = model.model.layers[0]
    hidden = layer0.input_layernorm(model.model.embed_tokens(ids))
    gate = layer0.self_attn.retention_gate
    manual = torch.nn.functional.logsigmoid(
        gate.linear2(torch.nn.functional.silu(gate.linear1(hidden))) + gate.bias)
    assert len(log_betas) == len(model.model.layers)
    torch.testing.assert_close(log_betas[0], manual)
    assert (log_betas[1] <= 0).all()


def test_padded_batch_rows_generate_what_they_generate_alone(family):
    model = gated(family)
    lengths = [9, 16, 5]
    ids, mask = left_padded(lengths)
    batch = generate(model, ids, mask, trimkv.make_cache("trimkv", memory_size=4, buffer_size=2))
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = generate(model, ids[b:b + 1, T - n:], cache=trimkv.make_cache("trimkv", memory_size=4, buffer_size=2))
        assert torch.equal(batch[b, T:], alone[0, n:]), f"row {b}"


def test_padding_never_occupies_budget():
    model = gated("llama")
    ids, mask = left_padded([3, 12])
    cache = trimkv.make_cache("trimkv", memory_size=8, buffer_size=5)
    generate(model, ids, mask, cache, max_new_tokens=1)
    # The first forward holds 3 and 12 real tokens, not 12 and 12 slots: padding was never stored.
    kept = cache.kept_positions(0)
    assert cache.count.tolist() == [3, 12]
    assert kept[0, 0].tolist()[:3] == [0, 1, 2] and (kept[0, :, 3:] == -1).all()


def test_prefill_longer_than_slots_is_compressed_into_them():
    model = gated("qwen3")
    ids, mask = left_padded([40, 25])
    cache = trimkv.make_cache("trimkv", memory_size=6, buffer_size=2)
    generate(model, ids, mask, cache, max_new_tokens=1)
    assert cache.slots == 8 and cache.count.tolist() == [6, 6]
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers)
    per_slot = 2 * 2 * 16 * 4 + 2 * 8 + 2 * 4  # (keys + values) * heads * head_dim * fp32 + positions + log beta
    assert cache.nbytes() == len(model.model.layers) * 2 * 8 * per_slot  # batch 2 * 8 slots


def test_full_policy_grows_without_evicting():
    model = gated("qwen3")
    ids, _ = left_padded([300])
    cache = trimkv.make_cache("full")
    generate(model, ids, cache=cache, max_new_tokens=4)
    assert cache.kept_positions(1)[0, 0].tolist() == list(range(303))


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="trimkv", memory_size=0), "memory_size must be a positive integer"),
    (dict(policy="trimkv", memory_size=-3), "memory_size must be a positive integer"),
    (dict(policy="trimkv"), "memory_size must be a positive integer"),
    (dict(policy="nope", memory_size=4), f"unknown policy 'nope'; valid policies: {', '.join(sorted(trimkv.POLICIES))}"),
    (dict(policy="trimkv", memory_size=4, sink=3, window=2), "sink + window <= memory_size"),
    (dict(policy="trimkv", memory_size=4, buffer_size=-1), "buffer_size must be >= 0"),
    (dict(policy="trimkv", memory_size=4, bogus=1), "bad option for policy 'trimkv'"),
])
def test_bad_cache_arguments_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        trimkv.make_cache(**kwargs)
    assert "\n" not in str(err.value)


def test_unsupported_model_and_missing_hooks_are_named():
    with pytest.raises(ValueError, match="unsupported model Linear: no decoder layers"):
        trimkv.attach_gates(torch.nn.Linear(2, 2))
    model = tiny_model("qwen3")
    with pytest.raises(RuntimeError, match="trimkv.prepare"):
        generate(model, left_padded([5])[0], cache=trimkv.make_cache("full"))
    trimkv.prepare(model)
    with pytest.raises(ValueError, match="needs 'log_beta'.*attach retention gates"):
        generate(model, left_padded([5])[0], cache=trimkv.make_cache("trimkv", memory_size=4))


def test_flash_attention_model_runs_its_bounded_cache_passes_through_sdpa(monkeypatch):
    # flash-attn cannot be built here: a stand-in under its name computes what it would for unpadded rows
    # (causal, bottom-right aligned, GQA) and records its calls. Passes over a bounded cache must not reach it.
    from transformers import AttentionInterface

    calls = []

    def flash_stand_in(module, query, key, value, attention_mask, scaling=None, **kwargs):
        calls.append(attention_mask)
        q, k = query.shape[2], key.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool).tril(k - q)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", flash_stand_in)
    ids, mask = left_padded([7, 12])
    expected = generate(randomize_gates(trimkv.attach_gates(tiny_model("qwen3"))), ids, mask,
                        trimkv.make_cache("trimkv", memory_size=5, buffer_size=2))
    model = tiny_model("qwen3")
    model.config._attn_implementation = "flash_attention_2"
    randomize_gates(trimkv.attach_gates(model))
    assert model.config._attn_implementation == "trimkv_flash_attention_2"
    out = generate(model, ids, mask, trimkv.make_cache("trimkv", memory_size=5, buffer_size=2))
    assert torch.equal(out, expected) and not calls
    # Without a bounded cache every pass is flash-attn's, with its own (padding) mask.
    row = ids[1:2]  # 12 tokens, no padding
    assert torch.equal(generate(model, row), generate(tiny_model("qwen3"), row))
    assert len(calls) == 24 * model.config.num_hidden_layers  # prompt + 23 decode steps, every layer
    trimkv.unprepare(model)
    assert model.config._attn_implementation == "flash_attention_2"


def test_eager_attention_gives_the_same_tokens_as_sdpa():
    ids, mask = left_padded([7, 12])
    outs = []
    for attn in ("sdpa", "eager"):
        model = randomize_gates(trimkv.attach_gates(tiny_model("qwen3", attn=attn)))
        outs.append(generate(model, ids, mask, trimkv.make_cache("trimkv", memory_size=5, buffer_size=2)))
    assert torch.equal(outs[0], outs[1])
