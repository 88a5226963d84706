"""The offline task: generator, tokenizer, tiny pretraining, the `synthetic` benchmark and its CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from trimkv.synthetic import task as T
from trimkv.synthetic.tokenizer import build_tokenizer, save_tokenizer

SMALL = T.TaskConfig(length=48, keys=4, values=4, filler=8, seed=3)
SIZES = {"train": 40, "validation": 12, "test": 12}


def test_generator_is_deterministic_per_seed(tmp_path):
    a, _ = T.make_example(T.TaskConfig(), "test", 7)
    b, _ = T.make_example(T.TaskConfig(), "test", 7)
    c, _ = T.make_example(T.TaskConfig(seed=1), "test", 7)
    assert a == b and a.text != c.text
    m1 = T.write_splits(tmp_path / "one", SMALL, SIZES)
    m2 = T.write_splits(tmp_path / "two", SMALL, SIZES)
    assert m1["files"] == m2["files"] and m1["splits"] == SIZES
    # A split is a prefix of its stream: a smaller split is the start of a bigger one.
    smaller = T.generate_splits(SMALL, {"train": 10, "validation": 12, "test": 12})
    assert [e.text for e in smaller["train"]] == [e.text for e in T.read_split(tmp_path / "one", "train", 10)]


def test_splits_are_disjoint():
    # 4 values ** 4 keys = 256 assignments: collisions would be common without the exclusion.
    splits = T.generate_splits(SMALL, {"train": 300, "validation": 40, "test": 40})
    sets = {s: {T.assignment(e) for e in examples} for s, examples in splits.items()}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    held_out = sets["validation"] | sets["test"]
    example, _ = T.make_example(SMALL, "train", 10_000, frozenset(held_out))
    assert T.assignment(example) not in held_out


def test_lengths_budget_ratio_and_layout():
    config = T.TaskConfig()
    assert config.length >= 8 * min(config.default_budgets())
    tokenizer = build_tokenizer(config)
    for index in range(20):
        example, words = T.make_example(config, "validation", index)
        ids = tokenizer(example.text)["input_ids"] + [tokenizer.eos_token_id]
        assert len(ids) == len(words) == config.length
        assert len(tokenizer(example.prompt)["input_ids"]) == config.prompt_tokens
        assert words[config.prompt_tokens - 1] == T.RECALL and words[-1] == T.EOS
        assert [words[p] for p in example.fact_positions] == example.answers  # facts, in key order
        # Short-lived pairs: other keys, each asked for by its cue 1 ... distractor_gap words later.
        first, second = example.distractor_positions[0::2], example.distractor_positions[1::2]
        assert len(first) >= config.n_distractors // 2
        for a, b in zip(first, second):
            key = int(words[a].split(":")[0][1:])
            assert words[a] == words[b] and words[b - 1] == T.cue(key) and 3 <= b - a <= config.distractor_gap + 2
            assert key >= config.keys
        assert max(example.fact_positions) <= config.span  # stated early ...
        assert config.prompt_tokens - max(example.fact_positions) > 0.7 * config.length  # ... recalled late
    with pytest.raises(ValueError, match="length"):
        T.TaskConfig(length=20)


def test_tokenizer_round_trip_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(T.TaskConfig(), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    example, words = T.make_example(T.TaskConfig(), "test", 0)
    ids = tokenizer(example.text)["input_ids"]
    assert ids + [tokenizer.eos_token_id] == [tokenizer.get_vocab()[w] for w in words]
    ids = tokenizer(example.text + " </s>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == example.text.removeprefix("<s> ")
    assert tokenizer.decode(ids) == " ".join(words)
    # Specials are bracketed, so none is matched inside a task word; unknown words map to <unk>.
    # The tokenizer adds nothing itself: the same ids whether a caller asks for special tokens or not.
    text = "<s> n1 k0:v1 zz <unk>"
    assert tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == ["<s>", "n1", "k0:v1", "<unk>", "<unk>"]
    # The chat template is the identity on one user turn and appends an answer as in pretraining.
    chat = [{"role": "user", "content": example.prompt}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == example.prompt
    chat.append({"role": "assistant", "content": " ".join(example.answers)})
    assert tokenizer.apply_chat_template(chat, tokenize=False) == example.text + " </s>"


def _tiny_pretrain_config(**kw):
    from trimkv.synthetic.pretrain import ModelShape, PretrainConfig

    shape = ModelShape(layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1, head_dim=16)
    return PretrainConfig(**{"steps": 24, "batch_size": 8, "lr": 1e-2, "warmup": 2, "curriculum": (),
                             "eval_every": 8, "eval_samples": 8, "target_accuracy": 1.01, "shape": shape, **kw})


def test_short_pretraining_lowers_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trimkv.synthetic.pretrain import pretrain

    T.write_splits(tmp_path / "data", SMALL, SIZES)
    metrics = pretrain(tmp_path / "data", tmp_path / "model", _tiny_pretrain_config(), progress=False)
    losses = [h["loss"] for h in metrics["loss_curve"]]
    assert len(losses) == 24 and sum(losses[-4:]) < sum(losses[:4])
    assert 0 <= metrics["validation_accuracy_full_cache"] <= 1 and metrics["evals"][-1]["step"] == 24
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["steps"] == 24 and not (tmp_path / "model" / "pretrain_checkpoint.pt").exists()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tokenizer)
    example = T.read_split(tmp_path / "data", "test", 1)[0]
    ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, SMALL.prompt_tokens, len(tokenizer))


def test_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch):
    from trimkv.synthetic import pretrain as P

    T.write_splits(tmp_path / "data", SMALL, SIZES)
    cfg = _tiny_pretrain_config(steps=16)
    P.pretrain(tmp_path / "data", tmp_path / "straight", cfg, progress=False)

    def killed(*args, **kwargs):  # the run dies after its last checkpoint, before writing the model
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(P, "generation_accuracy", killed)
        with pytest.raises(KeyboardInterrupt):
            P.pretrain(tmp_path / "data", tmp_path / "resumed", cfg, progress=False)
    assert (tmp_path / "resumed" / P.CHECKPOINT).exists()
    metrics = P.pretrain(tmp_path / "data", tmp_path / "resumed", cfg, progress=False)
    assert metrics["steps"] == 16
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint left by a run with other settings is refused, not silently mixed in.
    with monkeypatch.context() as m:
        m.setattr(P, "generation_accuracy", killed)
        with pytest.raises(KeyboardInterrupt):
            P.pretrain(tmp_path / "data", tmp_path / "other", cfg, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        P.pretrain(tmp_path / "data", tmp_path / "other", _tiny_pretrain_config(steps=16, lr=1e-3), progress=False)


def test_benchmark_loads_renders_and_scores(tmp_path):
    from trimkv.eval.base import BENCHMARKS, get_benchmark

    T.write_splits(tmp_path, SMALL, SIZES)
    bench = get_benchmark("synthetic")
    assert BENCHMARKS["synthetic"] is type(bench) and bench.chat is False
    samples = bench.load(tmp_path, limit=5)
    assert [s.id for s in samples] == [f"test-{i:06d}" for i in range(5)]
    sample = samples[0]
    answers = sample.meta["answers"]
    tokenizer = build_tokenizer(SMALL)
    assert bench.render(sample, tokenizer) == sample.prompt
    words = T.make_example(SMALL, "test", 0)[1]  # the harness feeds exactly the pretraining prompt
    assert bench.encode(sample, tokenizer) == [tokenizer.get_vocab()[w] for w in words[:SMALL.prompt_tokens]]

    def score(text):
        return bench.score(sample, text)["score"]

    wrong = [a.split(":")[0] + ":v" + str((int(a.split(":v")[1]) + 1) % SMALL.values) for a in answers]
    assert score(" ".join(answers)) == 1.0
    assert score(" ".join(reversed(answers))) == 1.0  # scored per key
    assert score(" ".join(answers[:2] + wrong[2:])) == 0.5
    assert score(" ".join(wrong[:1] + answers)) == 0.75  # the first word for a key counts
    assert score(" ".join(answers[:3])) == 0.75  # a missing key is wrong
    assert score("") == 0.0 and score("n1 recall garbage") == 0.0
    assert bench.score(sample, " ".join(answers))["extracted"] == " ".join(answers)
    with pytest.raises(ValueError, match="synthetic generate"):
        bench.load(tmp_path / "missing")
    validation = get_benchmark("synthetic")
    validation.configure(subset="validation")  # what choosing among seeds evaluates
    assert [s.id for s in validation.load(tmp_path, limit=2)] == ["validation-000000", "validation-000001"]
    with pytest.raises(ValueError, match="test or validation"):
        get_benchmark("synthetic").configure(subset="train")


def test_cli_generate_and_help(tmp_path, capsys):
    from trimkv.synthetic.cli import add_parser

    parser = argparse.ArgumentParser(prog="python -m trimkv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    for sub in ("generate", "tokenizer", "pretrain"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["synthetic", sub, "--help"])
        assert exit_.value.code == 0
    args = parser.parse_args(["synthetic", "generate", "--out", str(tmp_path / "d"), "--length", "64",
                              "--train", "3", "--validation", "2", "--test", "2"])
    assert args.func(args) == 0
    assert T.read_config(tmp_path / "d").length == 64
    args = parser.parse_args(["synthetic", "tokenizer", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t")])
    assert args.func(args) == 0 and (tmp_path / "t" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="length"):
        args = parser.parse_args(["synthetic", "generate", "--out", str(tmp_path / "e"), "--length", "12"])
        args.func(args)
