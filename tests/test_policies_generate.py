"""Every policy under stock generate: exactness at a large budget, boundedness at every pass (chunked
prefill and decoding), batch independence, and the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from test_cache import gated, generate, left_padded

import trimkv

POLICIES = sorted(trimkv.POLICIES)
BOUNDED = [name for name in POLICIES if trimkv.POLICIES[name].bounded and not trimkv.POLICIES[name].stores_all]
LENGTHS = [9, 16, 5]


@pytest.fixture(scope="module")
def models():
    return {family: gated(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_above_length_equals_full_cache(models, policy, family):
    model = models[family]
    ids, mask = left_padded(LENGTHS)
    full = generate(model, ids, mask, trimkv.make_cache("full"))
    for chunk in (None, 4):
        cache = trimkv.make_cache(policy, memory_size=64, buffer_size=8, prefill_chunk=chunk)
        assert torch.equal(generate(model, ids, mask, cache), full), f"prefill_chunk={chunk}"


@pytest.mark.parametrize("policy", BOUNDED)
def test_bounded_at_every_pass_with_chunked_prefill(models, policy):
    model = models["qwen3"]
    M, buf, chunk = 6, 2, 5
    cache = trimkv.make_cache(policy, memory_size=M, buffer_size=buf, prefill_chunk=chunk)
    widths, passes = [], []
    update = cache.update

    def recording_update(key, value, layer_idx, *args, **kwargs):
        out = update(key, value, layer_idx, *args, **kwargs)
        widths.append(out[0].shape[2])
        return out

    cache.update = recording_update

    def check(module, args, kwargs, output):
        passes.append(int(cache.count.max()))
        assert all(layer.keys.shape[2] == M + buf for layer in cache.layers)

    handle = model.model.register_forward_hook(check, with_kwargs=True)
    ids, mask = left_padded([23, 17])
    generate(model, ids, mask, cache, max_new_tokens=12)
    handle.remove()
    assert len(passes) == 5 + 11  # ceil(23 / 5) prefill chunks, then one pass per further token
    assert max(passes) <= M + buf
    assert max(widths) <= M + buf + chunk  # what attention sees in a pass: the slots plus one chunk


@pytest.mark.parametrize("policy", BOUNDED)
def test_padded_batch_rows_equal_rows_alone(models, policy):
    model = models["llama"]
    ids, mask = left_padded(LENGTHS)
    T = ids.shape[1]
    make = lambda: trimkv.make_cache(policy, memory_size=5, buffer_size=2, prefill_chunk=6)
    batch = generate(model, ids, mask, make())
    for b, n in enumerate(LENGTHS):
        alone = generate(model, ids[b:b + 1, T - n:], cache=make())
        assert torch.equal(batch[b, T:], alone[0, n:]), f"row {b}"


def test_chunked_prefill_keeps_the_recent_query_window():
    model = gated("qwen3")
    cache = trimkv.make_cache("snapkv", memory_size=6, buffer_size=2, prefill_chunk=4)
    ids, mask = left_padded([10, 7])
    generate(model, ids, mask, cache, max_new_tokens=3)
    # 10 + 2 and 7 + 2 tokens fed (the last generated one is not); the window holds the last 8 of each.
    positions = cache.layers[0].query_positions.tolist()
    assert positions[0] == list(range(4, 12))
    assert positions[1] == list(range(1, 9))


@pytest.mark.parametrize("policy", POLICIES)
def test_cli_generate_runs_every_policy(tmp_path_factory, policy, capsys):
    import json

    from test_cli import PROMPT

    from trimkv.cli import main

    root = tmp_path_factory.getbasetemp() / "cli_all_policies"
    if not (root / "gates").exists():
        from conftest import save_tiny_model, save_tiny_tokenizer
        from test_cache import randomize_attn_gates, randomize_gates, randomize_heads
        from transformers import AutoModelForCausalLM

        base = save_tiny_tokenizer(save_tiny_model(root / "base"))
        model = randomize_gates(trimkv.attach_gates(AutoModelForCausalLM.from_pretrained(base)))
        trimkv.save_gates(model, root / "gates", base_model=str(base))
        heads = trimkv.attach_retaining_heads(model, trimkv.LocretConfig(intermediate_size=32))
        trimkv.save_retaining_heads(randomize_heads(heads), root / "heads", base_model=str(base))
        seer = trimkv.attach_attn_gates(model, trimkv.SeerConfig(block_size=4, gate_hidden_size=8))
        trimkv.save_attn_gates(randomize_attn_gates(seer), root / "seer", base_model=str(base))
    checkpoint = root / ("heads" if "locret_score" in trimkv.POLICIES[policy].needs else
                         "seer" if policy == "seerattn_r" else "gates")
    args = ["generate", "--model", str(checkpoint), "--policy", policy, "--memory-size", "6",
            "--buffer-size", "2", "--prompt", PROMPT, "--max-new-tokens", "4", "--json", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"] == policy and report["generated_tokens"] == 4
    if trimkv.POLICIES[policy].bounded and not trimkv.POLICIES[policy].stores_all:
        assert max(report["kept_per_layer"]) <= 8
