"""SeerAttention-R: the target and the loss against brute force, the RoPE inverse, the block selection on a hand-made
case, exactness at a large budget, the full cache's memory, checkpoints, and training on CPU."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest
import torch
from conftest import save_tiny_model, tiny_model
from safetensors.torch import load_file, save_file
from test_cache import generate, left_padded
from test_train import config, files, fixed_sequences, mean_objective  # noqa: F401 (files is a fixture)
from transformers import AutoModelForCausalLM

import trimkv
from trimkv.seer import CONFIG_FILE, GATES_FILE, SeerConfig, decode_selection, gate_parameters, unrotate
from trimkv.train import seer_loss
from trimkv.train.seer_loss import block_attention, gate_kl
from trimkv.train.trainer import train

SMALL = SeerConfig(block_size=4, gate_hidden_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def seer(family="qwen3", seed=0, config=SMALL):
    """A tiny model with random AttnGates, spread out so no two blocks tie."""
    model = trimkv.attach_attn_gates(tiny_model(family, seed=seed), config)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in gate_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


# ---- the training target and loss -----------------------------------------------------------------------------------

def brute_force_blocks(query, key, scaling, b):
    """P[i, j] = max over the group and over keys t <= i of block j < i // b of softmax attention, normalised."""
    B, Hq, T, _ = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    n = math.ceil(T / b)
    out = torch.zeros(B, Hkv, T, n, dtype=torch.float64)
    for r in range(B):
        for h in range(Hkv):
            for i in range(T):
                for j in range(i // b):
                    best = 0.0
                    for g in range(G):
                        logits = [scaling * float(query[r, h * G + g, i] @ key[r, h, t]) for t in range(i + 1)]
                        z = sum(math.exp(x) for x in logits)
                        best = max(best, max(math.exp(logits[t]) / z for t in range(j * b, (j + 1) * b)))
                    out[r, h, i, j] = best
                total = out[r, h, i].sum()
                if total > 0:
                    out[r, h, i] /= total
    return out


@pytest.mark.parametrize("block_elements", [1, 200, 1 << 24])  # one query row per chunk, a few, all at once
def test_block_attention_matches_brute_force(block_elements):
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 11, 5, generator=g), torch.randn(2, 2, 11, 5, generator=g)
    got = block_attention(query, key, 0.7, 3, block_elements=block_elements)
    torch.testing.assert_close(got.double(), brute_force_blocks(query, key, 0.7, 3), rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 2, 11, 4) and torch.all(got[:, :, :3] == 0)  # rows 0..2 have no earlier block


def test_gate_kl_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    B, H, T, b = 2, 2, 10, 3
    n = math.ceil(T / b)
    logits = torch.randn(B, H, T, n, generator=g)
    target = block_attention(torch.randn(B, 2 * H, T, 4, generator=g), torch.randn(B, H, T, 4, generator=g), 1.0, b)
    target[0, 0, 7, 0] = 0.0  # a zero target entry contributes 0 (0 log 0)
    target[0, 0, 7] /= target[0, 0, 7].sum()
    for first in (0, 5):
        total, rows = gate_kl(logits, target, b, first)
        expected, count = 0.0, 0
        for r in range(B):
            for h in range(H):
                for i in range(max(first, b), T):
                    c = i // b
                    z = sum(math.exp(float(logits[r, h, i, j])) for j in range(c))
                    for j in range(c):
                        p = float(target[r, h, i, j])
                        if p > 0:
                            expected += p * (math.log(p) - (float(logits[r, h, i, j]) - math.log(z)))
                    count += 1
        assert rows == count
        assert float(total) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_unrotate_inverts_the_models_rope(family):
    model = seer(family)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 2, 7, attn.head_dim)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 9, 27, 81, 100, 200, 300]])
    cos, sin = model.model.rotary_emb(x, positions)
    rotate = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb
    rotated, _ = rotate(x, x, cos, sin)
    torch.testing.assert_close(unrotate(attn, rotated, positions), x, rtol=1e-5, atol=1e-5)


def test_objective_restores_the_model_and_needs_a_block():
    model = seer("qwen3")
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        parts = seer_loss.objective(model, ids, loss_slice=0.25)
    assert set(parts) == {"loss", "target_entropy"} and float(parts["loss"]) > 0
    assert model.config._attn_implementation == "trimkv_sdpa"  # restored
    with pytest.raises(ValueError, match="longer than the block size 4"):
        seer_loss.objective(model, ids[:, :4], loss_slice=0.0)


# ---- decoding: the selection and the cache -------------------------------------------------------------------------

def test_selection_picks_the_top_blocks_and_the_current_one(monkeypatch):
    """Block 4 tokens, budget 8 -> 2 earlier blocks per KV head, plus the block being written."""
    model = seer("qwen3")
    attn = model.model.layers[0].self_attn
    K, D = 20, attn.head_dim
    query, key = torch.randn(2, 4, 1, D), torch.randn(2, 2, K, D)
    positions = torch.tensor([19, 10])  # row 0: block 4, earlier blocks 0-3; row 1: block 2, earlier 0-1
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.2, 9.0], [0.9, 0.1, 0.2, 0.8, 9.0]],     # row 0, heads 0 and 1
                           [[0.0, -1.0, 7.0, 8.0, 9.0], [0.3, 0.2, 7.0, 8.0, 9.0]]])  # row 1: blocks >= 2 not eligible
    monkeypatch.setattr(attn.attn_gate, "logits", lambda q, qp, k, n: scores[:, :, None, :n])
    keep = decode_selection(attn, query, key, positions, budget=8)
    assert keep.shape == (2, 4, 1, K)

    def slots(*blocks, current):
        return [s for s in range(K) if s // 4 in blocks or s // 4 >= current]

    expected = {(0, 0): slots(1, 2, current=4), (0, 1): slots(0, 3, current=4),
                (1, 0): slots(0, 1, current=2), (1, 1): slots(0, 1, current=2)}
    for (row, head), want in expected.items():
        for g in (0, 1):  # both query heads of the group read their KV head's blocks
            assert keep[row, 2 * head + g, 0].nonzero().flatten().tolist() == want, (row, head, g)
    # the budget covers every block the 20 slots hold: nothing to narrow
    assert decode_selection(attn, query, key, positions, budget=20) is None
    assert decode_selection(attn, query.expand(2, 4, 3, D), key, positions, budget=8) is None  # prefill: dense


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_budget_at_least_length_equals_full_cache_and_holds_its_bytes(family):
    model = seer(family)
    ids, mask = left_padded([9, 16, 5])
    full_cache = trimkv.make_cache("full")
    full = generate(model, ids, mask, full_cache)
    for chunk in (None, 4):
        cache = trimkv.make_cache("seerattn_r", memory_size=40, prefill_chunk=chunk)  # 16 + 24 tokens at most
        assert torch.equal(generate(model, ids, mask, cache), full), f"prefill_chunk={chunk}"
        assert cache.nbytes() == full_cache.nbytes()
    small = trimkv.make_cache("seerattn_r", memory_size=4)
    assert not torch.equal(generate(model, ids, mask, small), full)  # 1 earlier block of 4: attention narrows
    assert small.nbytes() == full_cache.nbytes()  # the budget limits what is read, not what is stored
    for layer in range(2):
        assert torch.equal(small.kept_positions(layer), full_cache.kept_positions(layer))
    assert small.stats()["memory_size"] is None and small.budget == 4


def test_small_budget_reads_only_the_selected_blocks():
    """A decode step at a small budget equals attention over exactly the keys decode_selection keeps."""
    model = seer("qwen3")
    ids, _ = left_padded([30])
    masks = []
    from trimkv.cache import BoundedCache

    original = BoundedCache.layer_mask

    def recording(self, module, query, key, mask):
        out = original(self, module, query, key, mask)
        masks.append((query.shape[2], mask, out))
        return out

    BoundedCache.layer_mask = recording
    try:
        generate(model, ids, cache=trimkv.make_cache("seerattn_r", memory_size=8), max_new_tokens=3)
    finally:
        BoundedCache.layer_mask = original
    prefill = [m for m in masks if m[0] > 1]
    decode = [m for m in masks if m[0] == 1]
    assert prefill and all(torch.equal(before, after) for _, before, after in prefill)  # dense prefill
    for _, before, after in decode:  # 30+ tokens = 7 earlier blocks, 2 read + the current one
        assert after.shape[1] == 4 and bool((before & ~after).any())
        assert int(after[0, 0, 0].sum()) == 2 * 4 + (int(before[0, 0, 0].sum()) - 1) % 4 + 1


def test_a_model_without_gates_gets_a_clear_error():
    model = trimkv.prepare(tiny_model("qwen3"))
    ids, _ = left_padded([12])
    with pytest.raises(ValueError, match="policy 'seerattn_r' needs SeerAttention-R gates"):
        generate(model, ids, cache=trimkv.make_cache("seerattn_r", memory_size=4), max_new_tokens=2)
    with pytest.raises(ValueError, match="memory_size must be a positive integer for policy 'seerattn_r'"):
        trimkv.make_cache("seerattn_r")


# ---- checkpoints ----------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    base = save_tiny_model(tmp_path / "base", "qwen3")
    model = trimkv.attach_attn_gates(AutoModelForCausalLM.from_pretrained(base), SMALL)
    with torch.no_grad():
        for p in gate_parameters(model).values():
            p.normal_()
    out = trimkv.save_attn_gates(model, tmp_path / "seer", extra={"memory_size": 8})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, GATES_FILE]
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["base_model"] == str(base) and meta["seer_config"]["block_size"] == 4
    assert set(load_file(out / GATES_FILE)) == set(gate_parameters(model))

    loaded = trimkv.load_pretrained(out)
    assert loaded.trimkv_source["format"] == "seerattn_r" and loaded.trimkv_defaults == {"memory_size": 8}
    assert loaded.model.layers[0].self_attn.attn_gate.config == SMALL
    for name, p in gate_parameters(model).items():
        assert torch.equal(gate_parameters(loaded)[name], p), name
    ids, mask = left_padded([14, 9])
    a = generate(model.eval(), ids, mask, trimkv.make_cache("seerattn_r", memory_size=4))
    assert torch.equal(generate(loaded, ids, mask, trimkv.make_cache("seerattn_r", memory_size=4)), a)
    fresh = trimkv.load_gates(AutoModelForCausalLM.from_pretrained(base), out)  # into a given model
    assert torch.equal(generate(fresh, ids, mask, trimkv.make_cache("seerattn_r", memory_size=4)), a)

    other = save_tiny_model(tmp_path / "other", "qwen3", num_hidden_layers=3)
    with pytest.raises(ValueError, match="base model does not match .*num_layers expected 2, found 3"):
        trimkv.load_pretrained(out, base_model=str(other))
    tensors = load_file(out / GATES_FILE)  # a damaged file names the key
    tensors.pop("model.layers.1.self_attn.attn_gate.k_proj")
    save_file(tensors, out / GATES_FILE)
    with pytest.raises(ValueError, match=r"missing key 'model.layers.1.self_attn.attn_gate.k_proj'"):
        trimkv.load_pretrained(out)


# ---- training -------------------------------------------------------------------------------------------------------

def seer_config(files, out, **overrides):  # noqa: F811
    return config(files, out, method="seerattn_r", seer_block_size=8, seer_gate_hidden_size=16, lr=1e-2,
                  **overrides)


def test_training_lowers_the_loss(files, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    start = time.perf_counter()
    assert train(seer_config(files, out, max_steps=200, save_every=100)) == 0
    seconds = time.perf_counter() - start

    init = AutoModelForCausalLM.from_pretrained(files["base"], attn_implementation="sdpa")
    torch.manual_seed(0)
    trimkv.attach_attn_gates(init, SeerConfig(block_size=8, gate_hidden_size=16))
    trained = trimkv.load_pretrained(out)
    sequences = fixed_sequences(files)
    before, after = (mean_objective(seer_loss.objective, m, sequences) for m in (init, trained))
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["target_entropy"] == pytest.approx(before["target_entropy"])  # the same frozen teacher

    assert trained.trimkv_defaults == {"memory_size": 8} and trained.trimkv_source["format"] == "seerattn_r"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["complete"] and len(metrics["curves"]["loss"]) == 200
    params = json.loads((out / "params.json").read_text())
    assert params["method"] == "seerattn_r" and params["student_attention"] == "trimkv_seer"
    assert params["seer_config"]["block_size"] == 8
    assert (out / GATES_FILE).is_file() and not (out / "trimkv_gates.safetensors").exists()
    assert seconds < 60
    with pytest.raises(ValueError, match="--gradient-checkpointing has nothing to save with --method seerattn_r"):
        train(replace(seer_config(files, tmp_path / "gc"), gradient_checkpointing=True))


# ---- the report -----------------------------------------------------------------------------------------------------

def test_tables_note_the_full_memory_and_do_not_rank_it(tmp_path):
    from test_report_fixtures import eval_job

    from trimkv.report.collect import load_eval
    from trimkv.report.tables import score_tables

    for policy, budget, score in (("full", None, 0.9), ("trimkv", 16, 0.6), ("streaming", 16, 0.4),
                                  ("seerattn_r", 16, 0.8)):
        eval_job(tmp_path, "tiny", "synthetic", policy, budget, score)
    (table,) = score_tables(load_eval(tmp_path / "eval"))
    cells = {policy: cells[0] for (_, policy), cells in table.rows}
    assert cells["trimkv"].bold and not cells["seerattn_r"].bold  # the higher score is not memory-bounded
    assert any(note.startswith("seerattn_r: the budget bounds the tokens each decoding step reads") for note in
               table.notes)
