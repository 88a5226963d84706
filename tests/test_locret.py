"""LocRet: the loss and its targets against brute force, the heads' inputs, the policy on a hand-made case, the
bounded cache keeping the predicted top tokens, exactness at a large budget, checkpoints, and training on CPU."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model, tiny_model
from safetensors.torch import load_file, save_file
from test_cache import gated, generate, left_padded, randomize_heads
from test_train import config, files, fixed_sequences, mean_objective  # noqa: F401 (files is a fixture)
from transformers import AutoModelForCausalLM

import trimkv
from trimkv.compat import generate_cache_kwarg
from trimkv.locret import CONFIG_FILE, HEADS_FILE, LocretConfig, head_parameters, predict
from trimkv.policies import CacheView, get_policy
from trimkv.train import locret_loss
from trimkv.train.locret_loss import causal_importance
from trimkv.train.trainer import EXIT_PREEMPTED, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def headed(family="qwen3", seed=0, attn="sdpa"):
    model = trimkv.attach_retaining_heads(tiny_model(family, seed=seed, attn=attn), LocretConfig(intermediate_size=32))
    return randomize_heads(model, seed)


# ---- the objective against brute force ----------------------------------------------------------------------------

def brute_force_cis(query, key, scaling):
    """s_j = max over strictly later queries i and the group's query heads of softmax attention, by loops."""
    B, Hq, T, _ = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, T, Hkv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            logits = scaling * query[b, h].double() @ key[b, h // G].double().T  # (T, T)
            for i in range(T):
                probs = torch.softmax(logits[i, : i + 1], dim=-1)
                for j in range(i):
                    out[b, j, h // G] = max(out[b, j, h // G], probs[j])
    return out.float()


@pytest.mark.parametrize("block_elements", [1, 50, 1 << 24])  # one query per block, a few, all at once
def test_causal_importance_matches_brute_force(block_elements):
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    got = causal_importance(query, key, 0.4, block_elements=block_elements)
    torch.testing.assert_close(got, brute_force_cis(query, key, 0.4), rtol=1e-5, atol=1e-6)
    assert got[:, -1].abs().max() == 0  # the last token has no later query


def test_locret_loss_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    layers, B, n, H, alpha = 3, 2, 6, 2, 0.1
    preds = [torch.randn(B, n, H, generator=g) * 1.5 for _ in range(layers)]  # some |diff| > 1: both SmoothL1 branches
    targets = [torch.rand(B, n, H, generator=g) for _ in range(layers)]
    cis_terms, smooth = [], 0.0
    for p, t in zip(preds, targets):
        pairs = []
        for b in range(B):
            for j in range(n - 1):  # the last token has no target
                for h in range(H):
                    d = abs(float(p[b, j, h] - t[b, j, h]))
                    cis_terms.append(0.5 * d * d if d < 1 else d - 0.5)
                    if j + 1 < n - 1:
                        pairs.append(float(p[b, j + 1, h] - p[b, j, h]) ** 2)
        smooth += sum(pairs) / len(pairs)
    cis = sum(cis_terms) / len(cis_terms)
    parts = locret_loss.locret_loss(preds, targets, alpha)
    assert float(parts["cis"]) == pytest.approx(cis, rel=1e-5)
    assert float(parts["smoothness"]) == pytest.approx(smooth, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(cis + alpha * smooth, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        locret_loss.locret_loss([p[:, :1] for p in preds], [t[:, :1] for t in targets])


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_targets_are_the_frozen_models_attention(family, monkeypatch):
    """The objective's targets equal the CIS of the model's own attention weights (GQA), its predictions the
    heads' outputs."""
    model = headed(family, attn="eager")
    T, Hkv = 12, model.config.num_key_value_heads
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(0))
    seen = {}
    loss = locret_loss.locret_loss

    def spy(predictions, targets, *args):
        seen.update(predictions=predictions, targets=targets)
        return loss(predictions, targets, *args)

    monkeypatch.setattr(locret_loss, "locret_loss", spy)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per layer (1, H_q, T, T)
        parts = locret_loss.objective(model, ids)
    assert model.config._attn_implementation == "trimkv_eager"  # the objective switched it back
    assert len(seen["targets"]) == model.config.num_hidden_layers
    for got, want in zip(seen["predictions"], predict(model, ids)):
        torch.testing.assert_close(got, want)
    recorder = type("R", (), {"targets": seen["targets"]})
    later = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1)  # query i > key j
    for layer, weights in enumerate(attentions):
        G = weights.shape[1] // Hkv
        expected = weights.masked_fill(~later, 0).view(1, Hkv, G, T, T).amax(dim=(2, 3)).transpose(1, 2)
        torch.testing.assert_close(recorder.targets[layer], expected, rtol=1e-4, atol=1e-5)
    assert float(parts["loss"]) > 0 and math.isfinite(float(parts["loss"]))


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_heads_read_the_projections_before_rope(family):
    """Prediction = head([q_proj(x); k_proj(x); v_proj(x)]) (Phi-3: qkv_proj(x)), x the layer's normed input."""
    model = headed(family)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    predictions = predict(model, ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # input of layer l = hidden[l]
        for i, (layer, pred) in enumerate(zip(model.model.layers, predictions)):
            attn, x = layer.self_attn, layer.input_layernorm(hidden[i])
            qkv = attn.qkv_proj(x) if family == "phi3" else torch.cat([attn.q_proj(x), attn.k_proj(x),
                                                                       attn.v_proj(x)], dim=-1)
            torch.testing.assert_close(pred, attn.retaining_head(qkv), rtol=1e-5, atol=1e-6)
            assert pred.shape == (2, 9, model.config.num_key_value_heads)


# ---- the policy -----------------------------------------------------------------------------------------------------

def test_policy_keeps_top_predictions_and_the_local_window():
    B, H, N = 2, 2, 8
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 5, 8, 9, 99, 99]]).view(B, 1, N).expand(B, H, N)
    score = torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 0.05],  # row 0 head 0
                           [0.0, 0.5, 0.1, 0.6, 0.2, 0.4, 0.3, 0.05]],  # row 0 head 1
                          [[0.3, 0.9, 0.1, 0.8, 0.2, 0.0, 9.0, 9.0],  # row 1: 6 valid slots, stale high scores after
                           [0.3, 0.2, 0.1, 0.0, 0.5, 0.4, 9.0, 9.0]]])
    valid = torch.arange(N)[None, None, :] < torch.tensor([8, 6])[:, None, None]
    t = torch.tensor([9, 11]).view(B, 1, 1)  # tokens seen + 1
    view = CacheView(torch.zeros(B, H, N, 4), torch.zeros(B, H, N, 4), positions, {"locret_score": score}, t, valid,
                     memory_size=4)

    def kept(policy):
        scores = policy.score(view).float().masked_fill(~valid, -math.inf)
        return scores.topk(4, dim=-1).indices.sort(dim=-1).values.tolist()

    policy = get_policy("locret")
    assert policy.name == "locret" and policy.needs == ("locret_score",) and policy.bounded
    assert policy.local_window(4) == 2 and policy.local_window(6000) == 2500  # the released 2500 of 6000
    # window 2: row 0 keeps positions 6, 7 plus the two best others; row 1 keeps positions 8, 9 (slots 4, 5)
    assert kept(policy) == [[[0, 2, 6, 7], [1, 3, 6, 7]], [[1, 3, 4, 5], [0, 1, 4, 5]]]
    assert kept(get_policy("locret", n_local=0)) == [[[0, 2, 4, 5], [1, 3, 5, 6]], [[0, 1, 3, 4], [0, 1, 4, 5]]]
    # clamped to M = 4: row 0 keeps its 4 newest; row 1's last 4 positions seen are 6-9, of which only 8, 9 are
    # still cached (the window is by position, like the cache's own `window`), so its scores pick the other two
    assert kept(get_policy("locret", n_local=99)) == [[[4, 5, 6, 7]] * 2, [[1, 3, 4, 5], [0, 1, 4, 5]]]
    with pytest.raises(ValueError, match="n_local must be >= 0"):
        get_policy("locret", n_local=-1)


def test_bounded_cache_keeps_what_the_heads_predict():
    """One prefill pass of 20 tokens into M = 6: per layer and head, the last 2 plus the top 4 predicted others."""
    model = headed("llama")
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    predictions = predict(model, ids)
    cache = trimkv.make_cache("locret", memory_size=6, buffer_size=2)
    with torch.no_grad():
        model(ids, use_cache=True, **{generate_cache_kwarg(model): cache})
    for layer, pred in enumerate(predictions):
        score = pred.transpose(1, 2).clone()  # (B, H, T)
        score[..., -2:] = math.inf
        expected = score.topk(6, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(cache.kept_positions(layer), expected), layer


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_budget_above_length_equals_full_cache(family):
    model = gated(family)
    ids, mask = left_padded([9, 16, 5])
    full = generate(model, ids, mask, trimkv.make_cache("full"))
    for chunk in (None, 4):
        cache = trimkv.make_cache("locret", memory_size=64, buffer_size=8, prefill_chunk=chunk)
        assert torch.equal(generate(model, ids, mask, cache), full), f"prefill_chunk={chunk}"


def test_a_model_without_heads_gets_a_clear_error():
    model = trimkv.prepare(tiny_model("qwen3"))
    ids, mask = left_padded([9, 5])
    with pytest.raises(ValueError, match="policy 'locret' needs 'locret_score' for layer 0"):
        generate(model, ids, mask, trimkv.make_cache("locret", memory_size=4, buffer_size=2))
    with pytest.raises(ValueError, match="no LocRet retaining heads"):
        predict(model, ids)


# ---- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("locret_base") / "base", "qwen3")


def test_checkpoint_round_trip(tmp_path, base_dir):
    model = trimkv.attach_retaining_heads(AutoModelForCausalLM.from_pretrained(base_dir),
                                          LocretConfig(intermediate_size=32))
    randomize_heads(model, seed=5)
    out = trimkv.save_retaining_heads(model, tmp_path / "heads", extra={"memory_size": 8})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, HEADS_FILE]
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["base_model"] == str(base_dir) and meta["locret_config"]["intermediate_size"] == 32
    assert set(load_file(out / HEADS_FILE)) == set(head_parameters(model))

    loaded = trimkv.load_pretrained(out)
    assert loaded.trimkv_source["format"] == "locret" and loaded.trimkv_defaults == {"memory_size": 8}
    for name, p in head_parameters(model).items():
        assert torch.equal(head_parameters(loaded)[name], p), name
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    for a, b in zip(predict(model, ids), predict(loaded, ids)):
        assert torch.equal(a, b)
    fresh = trimkv.load_gates(AutoModelForCausalLM.from_pretrained(base_dir), out)  # into a given model
    assert torch.equal(predict(fresh, ids)[1], predict(model, ids)[1])

    other = save_tiny_model(tmp_path / "other", "qwen3", num_hidden_layers=3)
    with pytest.raises(ValueError, match="base model does not match .*num_layers expected 2, found 3"):
        trimkv.load_pretrained(out, base_model=str(other))
    tensors = load_file(out / HEADS_FILE)  # a damaged file names the key
    tensors.pop("model.layers.1.self_attn.retaining_head.fc2.weight")
    save_file(tensors, out / HEADS_FILE)
    with pytest.raises(ValueError, match=r"missing key 'model.layers.1.self_attn.retaining_head.fc2.weight'"):
        trimkv.load_pretrained(out)


# ---- training -------------------------------------------------------------------------------------------------------

def locret_config(files, out, **overrides):  # noqa: F811
    return config(files, out, method="locret", locret_intermediate_size=32, lr=3e-3, **overrides)


def test_training_lowers_the_loss(files, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    start = time.perf_counter()
    assert train(locret_config(files, out, max_steps=200, save_every=100)) == 0
    seconds = time.perf_counter() - start

    init = AutoModelForCausalLM.from_pretrained(files["base"], attn_implementation="sdpa")
    torch.manual_seed(0)
    trimkv.attach_retaining_heads(init, LocretConfig(intermediate_size=32))
    trained = trimkv.load_pretrained(out)
    sequences = fixed_sequences(files)
    before, after = (mean_objective(locret_loss.objective, m, sequences) for m in (init, trained))
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["cis_mean"] == pytest.approx(before["cis_mean"])  # the same frozen model, the same targets

    assert trained.trimkv_defaults == {"memory_size": 8} and trained.trimkv_source["format"] == "locret"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["complete"] and len(metrics["curves"]["loss"]) == 200
    assert set(metrics["curves"]) >= {"cis", "smoothness", "cis_mean", "lr"}
    params = json.loads((out / "params.json").read_text())
    assert params["method"] == "locret" and params["student_attention"] == "trimkv_locret"
    assert params["locret_config"]["intermediate_size"] == 32 and "gate_config" not in params
    assert (out / HEADS_FILE).is_file() and not (out / "trimkv_gates.safetensors").exists()
    assert seconds < 60


def test_training_resumes_exactly_and_refuses_checkpointing(files, tmp_path):  # noqa: F811
    cfg = locret_config(files, tmp_path / "straight", max_steps=5, save_every=2)
    assert train(cfg) == 0
    resumed = replace(cfg, out=str(tmp_path / "resumed"))
    assert train(resumed, stop_after=3) == EXIT_PREEMPTED
    assert train(resumed) == 0
    a, b = (load_file(tmp_path / d / HEADS_FILE) for d in ("straight", "resumed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--gradient-checkpointing has nothing to save with --method locret"):
        train(replace(cfg, out=str(tmp_path / "gc"), gradient_checkpointing=True))


def test_cis_of_a_uniform_attention():
    """Zero queries attend uniformly: key j gets 1/(j+2) from query j+1, its largest later share."""
    T = 6
    cis = causal_importance(torch.zeros(1, 2, T, 4), torch.randn(1, 1, T, 4), 1.0)
    expected = torch.tensor([1 / (j + 2) for j in range(T - 1)] + [0.0])
    torch.testing.assert_close(cis[0, :, 0], expected)
    assert F.relu(-cis).sum() == 0
