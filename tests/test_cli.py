"""`python -m trimkv generate` end to end on a tiny local checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import save_tiny_model, save_tiny_tokenizer
from test_cache import randomize_gates

import trimkv
from trimkv.cli import main

PROMPT = " ".join(f"w{i}" for i in range(10, 40))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_model(root / "base", "qwen3")
    save_tiny_tokenizer(base)
    model = randomize_gates(trimkv.attach_gates(trimkv.prepare(__import__("transformers").AutoModelForCausalLM
                                                               .from_pretrained(base))))
    trimkv.save_gates(model, root / "gates", base_model=str(base), extra={"memory_size": 6, "buffer_size": 2})
    return root


def run_json(capsys, *argv):
    assert main(["generate", *argv, "--json", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_from_a_gate_checkpoint_uses_its_budget(checkpoint, capsys):
    report = run_json(capsys, "--model", str(checkpoint / "gates"), "--prompt", PROMPT)
    assert report["memory_size"] == 6 and report["buffer_size"] == 2
    assert report["tokens_seen"] == 30 + 8 - 1  # the last generated token is never fed back
    assert report["slots_per_head"] == 8 and all(1 <= k <= 8 for k in report["kept_per_layer"])
    assert report["cache_bytes"] > 0 and report["generated_tokens"] == 8


def test_generate_full_policy_on_a_plain_model_keeps_everything(checkpoint, capsys):
    report = run_json(capsys, "--model", str(checkpoint / "base"), "--policy", "full", "--prompt", PROMPT)
    assert report["kept_per_layer"] == [37, 37]


def test_bad_input_gives_one_line_errors(checkpoint, capsys):
    base = str(checkpoint / "base")
    assert main(["generate", "--model", base, "--policy", "nope", "--prompt", "w5"]) == 2
    assert f"unknown policy 'nope'; valid policies: {', '.join(sorted(trimkv.POLICIES))}" in capsys.readouterr().err
    assert main(["generate", "--model", base, "--policy", "trimkv", "--memory-size", "4", "--prompt", "w5"]) == 2
    assert "needs retention gates" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint / "gates"), "--memory-size", "0", "--prompt", "w5"]) == 2
    assert "memory_size must be a positive integer" in capsys.readouterr().err


def test_help_describes_every_option():
    out = subprocess.run([sys.executable, "-m", "trimkv", "generate", "--help"], capture_output=True, text=True,
                         check=True)
    for option in ("--model", "--policy", "--memory-size", "--buffer-size", "--prompt", "--sink", "--window"):
        assert option in out.stdout


def test_bench_attention_backends_option(capsys):
    """`bench attention --backends triton` skips flex (whose 32K compilations take minutes); every bench says
    in one line that it needs a GPU."""
    import torch

    from trimkv.cli import build_parser

    args = build_parser().parse_args(["bench", "attention", "--lengths", "32768", "--backends", "triton"])
    assert args.backends == ["triton"] and args.lengths == [32768]
    assert build_parser().parse_args(["bench", "attention"]).backends == ["flex", "triton"]
    if not torch.cuda.is_available():
        assert main(["bench", "attention", "--backends", "triton"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_kernels_times_the_products_of_a_qwen3_4b_step(capsys):
    """`bench kernels` times the products a step of the benchmarked model runs, the layers that share an input as
    one: its shapes are those of the model's own layers (built on the meta device), gates attached."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import trimkv
    from trimkv.bench_decode import ARCHITECTURES
    from trimkv.bench_kernels import product_shapes
    from trimkv.cli import build_parser

    spec = dict(ARCHITECTURES["qwen3-4b"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        trimkv.attach_gates(model, trimkv.GateConfig())
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    qkv_gate = (attn.q_proj, attn.k_proj, attn.v_proj, attn.retention_gate.linear1)
    assert product_shapes("qwen3-4b") == [
        ("qkv+gate", sum(m.out_features for m in qkv_gate), attn.q_proj.in_features),
        ("o_proj", *attn.o_proj.weight.shape), ("gate+up", mlp.gate_proj.out_features * 2, mlp.gate_proj.in_features),
        ("down_proj", *mlp.down_proj.weight.shape), ("lm_head", *model.lm_head.weight.shape)]
    args = build_parser().parse_args(["bench", "kernels", "--rows", "4", "--sweep"])
    assert args.rows == [4] and args.sweep and args.slots == 1024 + 128
    if not torch.cuda.is_available():
        assert main(["bench", "kernels"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
