"""Gate checkpoints: our format round trip, the released upstream format, and every way a file can be bad."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from trimkv.checkpoint import (
    CONFIG_FILE,
    GATES_FILE,
    UPSTREAM_WEIGHTS_FILE,
    _resolve,
    load_gates,
    load_pretrained,
    save_gates,
)
from trimkv.gates import GateConfig, attach_gates, gate_parameters

GATE_KEY = "model.layers.{}.self_attn.retention_gate.{}"


@pytest.fixture
def no_base_weights(monkeypatch):
    """Make loading base model weights an error: checks that must run before it are seen to."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("base model weights were loaded before the checkpoint was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def randomize_gates(model, seed=1):
    """Non-init gate weights, so a loader that silently keeps the init values fails the tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen))


def trained_model(base_dir, gate_config=None):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    attach_gates(model, gate_config or GateConfig(intermediate_size=32, bias_init=8.0))
    randomize_gates(model)
    return model


def upstream_checkpoint(directory, base_dir, family="qwen3", tensors=None, **config_overrides):
    """A directory in the released format: base config + upstream fields, and a torch.save'd gate dict."""
    directory.mkdir()
    config = tiny_config(family).to_dict()
    config.update(base_model=str(base_dir), retention_gate_intermediate_size=32, retention_gate_bias_init=8.0,
                  memory_size=512, buffer_size=128, trainable_params="retention_gate", retention_gate="rg")
    config.update(config_overrides)
    (directory / "config.json").write_text(json.dumps(config))
    if tensors is None:
        gen = torch.Generator().manual_seed(2)
        shapes = {"linear1.weight": (32, 64), "linear1.bias": (32,), "linear2.weight": (2, 32), "bias": (2,)}
        tensors = {GATE_KEY.format(i, n): torch.randn(s, generator=gen) for i in range(2) for n, s in shapes.items()}
    torch.save(tensors, directory / UPSTREAM_WEIGHTS_FILE)
    return directory, tensors


@pytest.fixture
def base_dir(tmp_path):
    return save_tiny_model(tmp_path / "base", "qwen3")


@pytest.fixture
def saved(tmp_path, base_dir):
    """(checkpoint dir, model it was saved from) in our format."""
    model = trained_model(base_dir)
    return save_gates(model, tmp_path / "gates", extra={"memory_size": 64, "buffer_size": 16}), model


# ---- our format -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_load_pretrained_is_bit_identical(tmp_path, family):
    base_dir = save_tiny_model(tmp_path / "base", family)
    model = trained_model(base_dir)
    save_gates(model, tmp_path / "gates", revision="abc123", extra={"memory_size": 64})

    loaded = load_pretrained(tmp_path / "gates")

    expected, found = model.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys()
    assert any(".retention_gate." in k for k in found)
    for key in expected:
        assert torch.equal(expected[key], found[key]), key
    assert loaded.trimkv_gate_config == model.trimkv_gate_config
    assert loaded.trimkv_defaults == {"memory_size": 64}
    assert loaded.trimkv_source["format"] == "trimkv"
    assert loaded.trimkv_source["base_model"] == str(base_dir)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_saved_files_hold_only_gates_and_the_config(saved):
    from safetensors.torch import load_file

    path, model = saved
    tensors = load_file(path / GATES_FILE)
    assert set(tensors) == {GATE_KEY.format(i, n) for i in range(2)
                            for n in ("linear1.weight", "linear1.bias", "linear2.weight", "bias")}
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["base_model"] == model.config._name_or_path
    assert config["gate_config"] == GateConfig(intermediate_size=32, bias_init=8.0).to_dict()
    architecture = {k: config[k] for k in ("model_type", "num_layers", "hidden_size", "num_kv_heads")}
    assert architecture == {"model_type": "qwen3", "num_layers": 2, "hidden_size": 64, "num_kv_heads": 2}
    assert config["extra"] == {"memory_size": 64, "buffer_size": 16}
    assert sorted(p.name for p in path.iterdir()) == sorted([GATES_FILE, CONFIG_FILE])


def test_load_gates_into_a_given_model(saved, base_dir):
    path, model = saved
    target = AutoModelForCausalLM.from_pretrained(base_dir)
    assert load_gates(target, path) is target
    for key, p in gate_parameters(model).items():
        assert torch.equal(gate_parameters(target)[key], p)


def test_dtype_and_base_model_override(saved, base_dir):
    path, _ = saved
    loaded = load_pretrained(path, dtype=torch.bfloat16, base_model=str(base_dir))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_resolve_uses_a_local_directory_as_is(tmp_path):
    assert _resolve(tmp_path, revision=None) == tmp_path


# ---- released upstream format -------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["qwen3", "trimkv_qwen3"])
def test_upstream_checkpoint_loads_and_gates_compute_the_paper_formula(tmp_path, base_dir, model_type):
    path, tensors = upstream_checkpoint(tmp_path / "upstream", base_dir, model_type=model_type)

    model = load_pretrained(path)

    assert model.trimkv_defaults == {"memory_size": 512, "buffer_size": 128}
    assert model.trimkv_source["format"] == "upstream"
    assert model.trimkv_gate_config.bias_init == 8.0
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    for i, layer in enumerate(model.model.layers):
        names = ("linear1.weight", "linear1.bias", "linear2.weight", "bias")
        w1, b1, w2, b = (tensors[GATE_KEY.format(i, n)] for n in names)
        expected = F.logsigmoid(F.silu(h @ w1.T + b1) @ w2.T + b)
        torch.testing.assert_close(layer.self_attn.retention_gate(h), expected)


def test_upstream_llama_checkpoint_with_base_model_override(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "llama")
    path, _ = upstream_checkpoint(tmp_path / "upstream", "meta-llama/not-downloaded", family="llama")
    model = load_pretrained(path, base_model=str(base_dir))
    assert model.config.model_type == "llama"
    assert model.trimkv_source["base_model"] == str(base_dir)


# ---- bad checkpoints: one line naming the file and the key ----------------------------------------


def _gates_of(saved_path):
    from safetensors.torch import load_file

    return load_file(saved_path / GATES_FILE)


def _rewrite_ours(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, path / GATES_FILE)


KEY = GATE_KEY.format(1, "linear2.weight")


@pytest.mark.parametrize("fmt", ["trimkv", "upstream"])
@pytest.mark.parametrize("corruption, message", [
    ("missing", f"missing key '{KEY}'"),
    ("extra", "unexpected key 'model.layers.2.self_attn.retention_gate.bias'"),
    ("shape", f"wrong shape for '{KEY}': expected (2, 32), found (3, 32)"),
])
def test_bad_tensors_name_the_key(tmp_path, base_dir, saved, fmt, corruption, message, no_base_weights):
    path, _ = saved
    tensors = _gates_of(path)
    if corruption == "missing":
        del tensors[KEY]
    elif corruption == "extra":
        tensors["model.layers.2.self_attn.retention_gate.bias"] = torch.zeros(2)
    else:
        tensors[KEY] = torch.zeros(3, 32)
    if fmt == "trimkv":
        _rewrite_ours(path, tensors)
    else:
        path, _ = upstream_checkpoint(tmp_path / "upstream", base_dir, tensors=tensors)
    with pytest.raises(ValueError, match=r"^[^\n]*$") as err:
        load_pretrained(path)
    assert message in str(err.value)


@pytest.mark.parametrize("fmt", ["trimkv", "upstream"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_weights_file(tmp_path, base_dir, saved, fmt, damage, no_base_weights):
    path = saved[0] if fmt == "trimkv" else upstream_checkpoint(tmp_path / "upstream", base_dir)[0]
    file = path / (GATES_FILE if fmt == "trimkv" else UPSTREAM_WEIGHTS_FILE)
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.write_bytes(b"\x00not a tensor file" * 10)
    with pytest.raises(ValueError, match=rf"^trimkv: cannot read {file}: [^\n]*$"):
        load_pretrained(path)


def test_our_config_without_its_weights_file(saved, no_base_weights):
    path, _ = saved
    (path / GATES_FILE).unlink()
    with pytest.raises(ValueError, match=rf"^trimkv: cannot read {path / GATES_FILE}: FileNotFoundError"):
        load_pretrained(path)


def test_pth_holding_something_else_is_unreadable(tmp_path, base_dir):
    path, _ = upstream_checkpoint(tmp_path / "upstream", base_dir, tensors={"a": 1})
    with pytest.raises(ValueError, match="cannot read .*trimkv_weights.pth: expected a dict of tensors"):
        load_pretrained(path)


@pytest.mark.parametrize("fmt", ["trimkv", "upstream"])
def test_mismatched_base_model_names_the_field(tmp_path, saved, fmt, no_base_weights):
    other = save_tiny_model(tmp_path / "other", "qwen3", num_hidden_layers=3)
    path = saved[0] if fmt == "trimkv" else upstream_checkpoint(tmp_path / "upstream", other)[0]
    with pytest.raises(ValueError, match=r"^trimkv: base model does not match .*: num_layers expected 2, found 3$"):
        load_pretrained(path, base_model=str(other))


def test_mismatched_family_names_model_type(tmp_path, saved):
    llama = save_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="model_type expected 'qwen3', found 'llama'"):
        load_gates(AutoModelForCausalLM.from_pretrained(llama), saved[0])


def test_upstream_config_without_gate_fields_names_the_key(tmp_path, base_dir):
    path, _ = upstream_checkpoint(tmp_path / "upstream", base_dir)
    config = json.loads((path / "config.json").read_text())
    del config["retention_gate_intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing key 'retention_gate_intermediate_size'"):
        load_pretrained(path)


def test_unsupported_upstream_gate_kind(tmp_path, base_dir):
    path, _ = upstream_checkpoint(tmp_path / "upstream", base_dir, retention_gate="rg3")
    with pytest.raises(ValueError, match="retention_gate 'rg3' is not supported"):
        load_pretrained(path)


def test_corrupt_config_json(saved):
    path, _ = saved
    (path / CONFIG_FILE).write_text('{"format_version": 1, "base_')
    with pytest.raises(ValueError, match=rf"^trimkv: cannot read {path / CONFIG_FILE}: JSONDecodeError"):
        load_pretrained(path)


def test_directory_of_neither_format(tmp_path, base_dir):
    with pytest.raises(ValueError, match=rf"^trimkv: {base_dir} is not a gate checkpoint"):
        load_pretrained(base_dir)


# ---- atomic save ----------------------------------------------------------------------------------


def _failing_save(monkeypatch):
    import safetensors.torch

    def write_half_then_die(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_die)


def test_failed_save_leaves_no_file(tmp_path, base_dir, monkeypatch):
    model = trained_model(base_dir)
    _failing_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_gates(model, tmp_path / "gates")
    assert list((tmp_path / "gates").iterdir()) == []


def test_failed_overwrite_does_not_look_finished(saved, monkeypatch):
    path, model = saved
    _failing_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_gates(model, path)
    assert not (path / CONFIG_FILE).exists()  # the old gates stay, but no longer marked complete
    with pytest.raises(ValueError, match="is not a gate checkpoint"):
        load_pretrained(path)


def test_upstream_checkpoint_drives_eviction(tmp_path, base_dir):
    """The imported gates rank tokens: layer 0's kept set equals a brute-force top-M of its log betas."""
    from test_cache import brute_force_kept, generate, left_padded

    import trimkv

    g = torch.Generator().manual_seed(5)
    tensors = {GATE_KEY.format(i, name): torch.randn(shape, generator=g) * scale
               for i in range(2) for name, shape, scale in (("linear1.weight", (32, 64), 0.5),
                                                            ("linear1.bias", (32,), 0.5),
                                                            ("linear2.weight", (2, 32), 0.5), ("bias", (2,), 2.0))}
    path, _ = upstream_checkpoint(tmp_path / "upstream", base_dir, tensors=tensors)
    model = load_pretrained(path)
    cache = trimkv.make_cache("trimkv", memory_size=4, buffer_size=2)  # the checkpoint's M=512 would never evict
    ids, _ = left_padded([12])
    out = generate(model, ids, cache=cache, max_new_tokens=10)
    log_beta = trimkv.retention(model, out[:, :-1])[0][0]  # layer 0 sees only the token itself: context-free
    chunks = [12] + [1] * 9
    per_pass = [log_beta[:12]] + [log_beta[12 + k: 13 + k] for k in range(9)]
    assert cache.kept_positions(0)[0].tolist() == brute_force_kept(per_pass, chunks, 4, 2)[-1]
