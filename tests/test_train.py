"""The gate trainer on a tiny model (CPU, fp32): it learns, touches only the gates, resumes exactly, survives SIGTERM,
stops on NaN, refuses bad input before any compute, and gives the same gates under torchrun and DeepSpeed."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, save_tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import trimkv
from trimkv.train import distributed, losses, trainer
from trimkv.train.data import SequenceStream, open_files
from trimkv.train.losses import attention_implementation, objective
from trimkv.train.trainer import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteLossError, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Qwen3 + a word-level tokenizer with a chat template, and 24 conversations of ~64 tokens."""
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_model(root / "base")
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_tokenizer(base))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(4, 97)}" for _ in range(n))

    rows = [{"messages": [{"role": "user", "content": words(34)}, {"role": "assistant", "content": words(26)}]}
            for _ in range(24)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": base, "data": data}


def config(files, out, **overrides) -> TrainConfig:
    """Small and fast: M = 8 of 64 tokens, a 32-wide gate; lr and bias init so 200 steps visibly learn."""
    kwargs = dict(model=str(files["base"]), data=[str(files["data"])], out=str(out), memory_size=8, max_steps=4,
                  max_length=64, grad_accum=1, lr=1e-2, gate_bias_init=3.0, gate_intermediate_size=32,
                  save_every=100)
    return TrainConfig(**{**kwargs, **overrides})


def cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    trainer.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def gates_of(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "trimkv_gates.safetensors")


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train_parser = trainer.add_parser(sub)
    options = [a for a in train_parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    assert len(options) == len(trainer.fields(TrainConfig)) + 1  # + --help
    assert all(a.help and len(a.help) > 10 for a in options)
    help_text = train_parser.format_help()
    for flag in ("--memory-size", "--capacity-form", "--deepspeed", "--resume", "--gradient-checkpointing"):
        assert flag in help_text


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the input was validated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_bad_input_fails_before_any_compute(files, tmp_path, no_model_load):
    base = ["--model", str(files["base"]), "--data", str(files["data"]), "--out", str(tmp_path / "o"),
            "--max-steps", "2", "--max-length", "64"]
    cases = {
        "--memory-size must be > 0, got 0": ["--memory-size", "0"],
        "--max-length \\(64\\) must be >= --memory-size \\(65\\)": ["--memory-size", "65"],
        "training data file not found: .*nope.jsonl": ["--memory-size", "8", "--data", str(tmp_path / "nope.jsonl")],
        "DeepSpeed config not found": ["--memory-size", "8", "--deepspeed", str(tmp_path / "ds.json")],
        "--grad-accum must be >= 1": ["--memory-size", "8", "--grad-accum", "0"],
        "--resume .*elsewhere: not a training checkpoint": ["--memory-size", "8", "--resume",
                                                            str(tmp_path / "elsewhere")],
    }
    for message, extra in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            trainer.main(cli_args(base + extra))
        assert "\n" not in str(e.value)
    plain = save_tiny_tokenizer(tmp_path / "plain-tokenizer")  # no chat template
    with pytest.raises(ValueError, match="plain-tokenizer has no chat template.*chat.jsonl"):
        trainer.main(cli_args(base + ["--memory-size", "8", "--tokenizer", str(plain)]))
    (tmp_path / "o" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "o" / "checkpoints" / "step-00000001" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--resume never would overwrite them"):
        trainer.main(cli_args(base + ["--memory-size", "8", "--resume", "never"]))


def test_at_bias_init_the_student_is_the_teacher(files):
    model = AutoModelForCausalLM.from_pretrained(files["base"], attn_implementation="sdpa").eval()
    trimkv.attach_gates(model, trimkv.GateConfig())  # bias 10: beta = 0.99995
    ids = torch.randint(4, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts = evaluate(model, ids)
        plain_ntp = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert float(parts["kl"]) < 1e-6
    assert float(parts["ntp"]) == pytest.approx(float(plain_ntp), abs=1e-4)
    assert float(parts["capacity"]) == pytest.approx(1.0, abs=1e-2)  # S_t ~ t: every t > M is over budget


def fixed_sequences(files, n=6):
    tokenizer = AutoTokenizer.from_pretrained(files["base"])
    stream = SequenceStream(open_files([files["data"]]), tokenizer, 64, seed=123)
    return [next(stream).unsqueeze(0) for _ in range(n)]


def evaluate(model, ids) -> dict[str, torch.Tensor]:
    """The training objective with M = 8: student trimkv_reference, teacher the model's plain attention."""
    plain = model.config._attn_implementation
    with attention_implementation(model, "trimkv_reference"):
        return objective(model, ids, memory_size=8, teacher=plain)


def mean_objective(objective, model, sequences) -> dict[str, float]:
    """A training objective's parts (loss, ...) averaged over fixed sequences, without gradients (here and in
    the LocRet and SeerAttention-R training tests)."""
    with torch.no_grad():
        parts = [objective(model, ids) for ids in sequences]
    return {k: sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}


def test_training_lowers_the_loss_and_leaves_the_base_untouched(files, tmp_path, monkeypatch):
    loaded = []
    original = AutoModelForCausalLM.from_pretrained

    def keep(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep)
    out = tmp_path / "out"
    start = time.perf_counter()
    assert train(config(files, out, max_steps=200, save_every=50)) == 0
    seconds = time.perf_counter() - start
    monkeypatch.undo()

    # the model the trainer used: base tensors bit-identical to the saved base, gates changed
    trained = loaded[0]
    fresh = AutoModelForCausalLM.from_pretrained(files["base"])
    base_state = {k: v for k, v in trained.state_dict().items() if ".retention_gate." not in k}
    assert base_state.keys() == fresh.state_dict().keys()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(base_state[name], tensor), name

    # the objective on held-out order, at init vs trained: lower, through a smaller capacity excess
    init = AutoModelForCausalLM.from_pretrained(files["base"], attn_implementation="sdpa")
    torch.manual_seed(0)
    trimkv.attach_gates(init, trimkv.GateConfig(intermediate_size=32, bias_init=3.0))
    after = trimkv.load_pretrained(out)
    sequences = fixed_sequences(files)
    before, now = (mean_objective(evaluate, m, sequences) for m in (init, after))
    assert now["loss"] < before["loss"] - 0.05, (before, now)
    assert now["capacity"] < 0.5 * before["capacity"] and now["beta_mean"] < before["beta_mean"]

    # outputs: gates with their budget, metrics with per-step curves, params, log, pruned checkpoints
    assert after.trimkv_defaults == {"memory_size": 8}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["complete"] and metrics["final"]["steps"] == 200
    assert len(metrics["curves"]["loss"]) == 200 and set(metrics["curves"]) >= {"kl", "ntp", "capacity", "lr"}
    assert metrics["curves"]["lr"][-1] < metrics["curves"]["lr"][20]  # cosine decay
    params = json.loads((out / "params.json").read_text())
    assert params["memory_size"] == 8 and params["lr"] == 1e-2 and params["student_attention"] == "trimkv_reference"
    assert "step=200 " in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000150", "step-00000200"]
    assert seconds < 60


def test_stopped_after_step_k_and_resumed_equals_uninterrupted(files, tmp_path):
    cfg = config(files, tmp_path / "straight", max_steps=7, grad_accum=2, save_every=3, pack=True)
    assert train(cfg) == 0
    resumed = replace(cfg, out=str(tmp_path / "resumed"))
    assert train(resumed, stop_after=4) == EXIT_PREEMPTED
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000004").is_dir()
    assert not (tmp_path / "resumed" / "trimkv_gates.safetensors").exists()
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["final"]["complete"] is False
    assert train(resumed) == 0
    a, b = gates_of(tmp_path / "straight"), gates_of(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    curves = [json.loads((tmp_path / d / "metrics.json").read_text())["curves"] for d in ("straight", "resumed")]
    assert curves[0]["loss"] == curves[1]["loss"] and curves[0]["tokens"] == curves[1]["tokens"]
    assert "resuming from" in (tmp_path / "resumed" / "train.log").read_text()


def test_resume_refuses_changed_options(files, tmp_path):
    cfg = config(files, tmp_path / "o", max_steps=2)
    assert train(cfg, stop_after=1) == EXIT_PREEMPTED
    with pytest.raises(ValueError, match="cannot resume from .*step-00000001: --lr was 0.01, now 0.02"):
        train(replace(cfg, lr=2e-2))
    assert train(replace(cfg, max_steps=3)) == 0  # a longer run may continue


def test_sigterm_writes_a_checkpoint_and_exits_143(files, tmp_path):
    out = tmp_path / "o"
    argv = ["--model", str(files["base"]), "--data", str(files["data"]), "--out", str(out), "--memory-size", "8",
            "--max-length", "64", "--grad-accum", "2", "--max-steps", "100000", "--save-every", "100000",
            "--gate-intermediate-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "trimkv.train.trainer", *argv], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train.log", time.time() + 120
    while time.time() < deadline and not (log.is_file() and "step=3 " in log.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == EXIT_PREEMPTED, stderr
    [ckpt] = list((out / "checkpoints").iterdir())
    step = int(ckpt.name.split("-")[1])
    assert step >= 3 and f"stopped (SIGTERM) after step {step}" in log.read_text()
    assert train(config(files, out, max_steps=step + 2, grad_accum=2, gate_bias_init=10.0, lr=2e-4)) == 0
    assert json.loads((out / "metrics.json").read_text())["final"]["steps"] == step + 2


def test_nan_stops_with_step_and_part_and_keeps_the_last_checkpoint(files, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    capacity = losses.capacity_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = capacity(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(losses, "capacity_loss", poisoned)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3 \\(micro-batch 1\\): loss = nan"):
        train(config(files, out, save_every=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    calls["n"] = 0  # main(): a one-line error and exit status 3
    argv = ["--model", str(files["base"]), "--data", str(files["data"]), "--out", str(tmp_path / "p"),
            "--memory-size", "8", "--max-length", "64", "--max-steps", "20", "--grad-accum", "1"]
    assert trainer.main(cli_args(argv)) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "error: non-finite loss at step 3" in err and "last good checkpoint: none" in err


def test_gradient_checkpointing_gives_the_same_gates(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = trimkv.RetentionGate.forward

    def counted(self, hidden):
        calls["n"] += 1
        return forward(self, hidden)

    monkeypatch.setattr(trimkv.RetentionGate, "forward", counted)
    plain = config(files, tmp_path / "plain", max_steps=2)
    assert train(plain) == 0
    assert calls["n"] == 2 * 2  # steps x layers: the student only, the teacher runs no gate
    assert train(replace(plain, out=str(tmp_path / "ckpt"), gradient_checkpointing=True)) == 0
    assert calls["n"] == 4 + 2 * 2 * 2  # each layer recomputed in the backward pass
    a, b = gates_of(tmp_path / "plain"), gates_of(tmp_path / "ckpt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_torchrun_two_processes_equal_one_process_with_double_accumulation(files, tmp_path):
    """Data parallel over 2 CPU processes (gloo): the same sequences, averaged gradients (~15 s)."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    argv = ["--model", str(files["base"]), "--data", str(files["data"]), "--memory-size", "8", "--max-length", "64",
            "--max-steps", "3", "--lr", "1e-2", "--gate-bias-init", "3", "--gate-intermediate-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(distributed.free_port()),
                          "-m", "trimkv.train.trainer", *argv, "--out", str(tmp_path / "ddp"), "--grad-accum", "1"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert train(config(files, tmp_path / "one", max_steps=3, grad_accum=2)) == 0
    a, b = gates_of(tmp_path / "ddp"), gates_of(tmp_path / "one")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "ddp" / "params.json").read_text())["world_size"] == 2


def test_deepspeed_zero2_equals_plain_and_resumes(files, tmp_path):
    """DeepSpeed ZeRO-2 on one CPU process (fp32): the same gates as the plain trainer, also across a resume."""
    pytest.importorskip("deepspeed")
    ds = str(REPO / "configs" / "deepspeed_zero2.json")
    plain = config(files, tmp_path / "plain", max_steps=4, grad_accum=2)
    assert train(plain) == 0
    with_ds = replace(plain, out=str(tmp_path / "ds"), deepspeed=ds)
    assert train(with_ds, stop_after=2) == EXIT_PREEMPTED
    assert (tmp_path / "ds" / "checkpoints" / "step-00000002" / "deepspeed").is_dir()
    assert train(with_ds) == 0
    a, b = gates_of(tmp_path / "plain"), gates_of(tmp_path / "ds")
    for name in a:
        assert b[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_deepspeed_config_auto_values():
    ds = json.loads((REPO / "configs" / "deepspeed_zero2.json").read_text())
    distributed.fill_deepspeed_config(ds, "ds.json", grad_accum=4, max_grad_norm=1.0, world=2, dtype=torch.bfloat16)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 8 but the options give 4"):
        distributed.fill_deepspeed_config({"gradient_accumulation_steps": 8}, "ds.json", 4, 1.0, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        distributed.fill_deepspeed_config({"optimizer": {"type": "Adam"}}, "ds.json", 4, 1.0, 2, torch.bfloat16)
