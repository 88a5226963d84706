"""The evaluation runner: batched generation with the bounded cache, resume after a kill, metrics, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import save_tiny_model, save_tiny_tokenizer

import trimkv
from trimkv.eval import runner
from trimkv.eval.base import Benchmark, GenerationSettings, Sample, read_rows, register

FIXTURES = Path(__file__).parent / "fixtures"
GENERATE = runner.generate_batch


@register
class FixtureWords(Benchmark):
    """Random word prompts; the score is the share of the prompt's words the output repeats (non-trivial
    for a random model, so identical metrics mean identical generations)."""

    name = "fixture_words"
    dataset = "tests/fixtures/fixture_words"
    revision = "0"
    settings = GenerationSettings(max_new_tokens=6)
    chat = False

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        rows = read_rows([Path(data_dir) / "items.jsonl"])[:limit]
        return [Sample(r["id"], r["text"], r["text"].split(), r["group"]) for r in rows]

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        repeated = set(output.split()) & set(sample.references)
        return {"score": len(repeated) / len(set(sample.references)), "extracted": sorted(repeated)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = save_tiny_model(tmp_path_factory.mktemp("runner") / "tiny")
    save_tiny_tokenizer(path)
    return path


def run(model_dir, out, **kw):
    args = {"model": str(model_dir), "benchmark": "fixture_words", "policy": "full", "budget": None, "out": out,
            "data_dir": FIXTURES / "fixture_words", "batch_size": 3, "device": "cpu", "progress": False}
    return runner.evaluate(**{**args, **kw})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the runner can catch and handle it."""


class Counting:
    """Wraps runner.generate_batch: counts the sequences generated, optionally dies after some batches."""

    def __init__(self, die_after: int | None = None):
        self.batches, self.sequences, self.die_after = 0, 0, die_after

    def __call__(self, model, input_ids, *args, **kwargs):
        if self.die_after is not None and self.batches == self.die_after:
            raise Killed  # the job is killed mid-run
        self.batches += 1
        self.sequences += input_ids.shape[0]
        return GENERATE(model, input_ids, *args, **kwargs)


def test_killed_run_resumes_to_identical_metrics_without_regenerating(model_dir, tmp_path, monkeypatch):
    clean = run(model_dir, tmp_path / "clean")
    assert clean["n_rows"] == 10 and clean["complete"] and 0 < clean["score"] < 1

    out = tmp_path / "resumed"
    monkeypatch.setattr(runner, "generate_batch", Counting(die_after=2))
    with pytest.raises(Killed):
        run(model_dir, out)
    finished = {r["id"] for r in rows(out)}
    assert len(finished) == 6 and not (out / "metrics.json").exists()
    with open(out / "samples.jsonl", "a") as f:  # killed while writing the next line
        f.write('{"id": "item9", "sample": 0, "outp')

    second = Counting()
    monkeypatch.setattr(runner, "generate_batch", second)
    resumed = run(model_dir, out)
    assert second.sequences == 4  # only the unfinished samples were generated
    assert resumed == clean | {"params": resumed["params"]} and resumed["params"] == clean["params"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads((tmp_path / "clean" / "metrics.json").read_text())
    def key(row):
        return row["id"], row["sample"]

    assert sorted(rows(out), key=key) == sorted(rows(tmp_path / "clean"), key=key)

    third = Counting()
    monkeypatch.setattr(runner, "generate_batch", third)
    assert run(model_dir, out) == clean and third.sequences == 0  # nothing left to do


def test_sigkilled_process_resumes_to_the_same_metrics(model_dir, tmp_path):
    """A real kill -9 of `python -m trimkv eval` mid-run, then a rerun of the same command."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [sys.executable, "-m", "trimkv", "eval", "--model", str(model_dir), "--benchmark", "gsm8k",
                "--policy", "full", "--data-dir", str(FIXTURES / "gsm8k"), "--samples", "4", "--temperature", "0.7",
                "--max-new-tokens", "24", "--device", "cpu", "--no-progress", "--out", str(out)]

    cwd = Path(__file__).parent.parent
    run(model_dir, tmp_path / "clean", benchmark="gsm8k", data_dir=FIXTURES / "gsm8k", samples=4, temperature=0.7,
        max_new_tokens=24, batch_size=1)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    written = log.read_text().count("\n")
    if proc.returncode != -signal.SIGKILL or written >= 12:
        pytest.skip("the run finished before it could be killed")
    subprocess.run(command(out), cwd=cwd, check=True, capture_output=True)
    assert len(rows(out)) == 12
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed == clean | {"params": resumed["params"]}


def test_rows_and_metrics_hold_what_the_paper_tables_need(model_dir, tmp_path):
    metrics = run(model_dir, tmp_path / "m", samples=2, temperature=0.8, top_p=0.9, limit=4)
    row = rows(tmp_path / "m")[0]
    assert {"id", "sample", "output", "extracted", "score", "generated_tokens", "cache_bytes"} <= set(row)
    assert 1 <= row["generated_tokens"] <= 6 and row["cache_bytes"] > 0
    assert metrics["n_problems"] == 4 and metrics["n_rows"] == 8 and metrics["samples_per_problem"] == 2
    lo, hi = metrics["ci95"]
    assert lo <= metrics["score"] <= hi
    assert set(metrics["per_category"]) <= {"short", "long"}
    assert sum(c["n"] for c in metrics["per_category"].values()) == 4
    assert json.loads((tmp_path / "m" / "params.json").read_text())["temperature"] == 0.8


def test_bounded_cache_holds_less_than_the_full_one(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base")
    save_tiny_tokenizer(base)
    gated = trimkv.attach_gates(trimkv.prepare(AutoModelForCausalLM.from_pretrained(base)))
    trimkv.save_gates(gated, tmp_path / "gates", base_model=str(base))
    full = run(tmp_path / "gates", tmp_path / "full", limit=4)
    bounded = run(tmp_path / "gates", tmp_path / "bounded", policy="trimkv", budget=4, buffer_size=2, limit=4)
    assert bounded["params"]["budget"] == 4 and full["params"]["budget"] is None
    assert bounded["cache_bytes_max"] < full["cache_bytes_mean"]


def test_multi_turn_conversation_reuses_one_cache(model_dir, tmp_path, monkeypatch):
    args = {"benchmark": "scbench", "subset": "scbench_kv", "data_dir": FIXTURES / "scbench", "batch_size": 1}
    metrics = run(model_dir, tmp_path / "sc", **args)
    turns = rows(tmp_path / "sc")
    assert [r["id"] for r in turns] == ["scbench_kv/0/0", "scbench_kv/0/1"] and metrics["n_rows"] == 2
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"]  # turn 2 continues turn 1 + its gold answer
    # with the full cache, continuing the kept state equals generating from the whole history at once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trimkv.eval import get_benchmark

    model = trimkv.prepare(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    bench = get_benchmark("scbench")
    bench.configure(subset="scbench_kv")
    first, second = bench.load(FIXTURES / "scbench")
    ids = bench.encode(first, tok) + tok(bench.follow_up(second, first, tok), add_special_tokens=False)["input_ids"]
    assert len(ids) == turns[1]["prompt_tokens"]
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=150, do_sample=False, pad_token_id=0,
                         **{runner_cache_kwarg(model): trimkv.make_cache("full")})
    assert tok.decode(out[0, len(ids):], skip_special_tokens=True) == turns[1]["output"]
    counting = Counting()
    monkeypatch.setattr(runner, "generate_batch", counting)
    assert run(model_dir, tmp_path / "sc", **args) == metrics and counting.sequences == 0


def runner_cache_kwarg(model) -> str:
    from trimkv.compat import generate_cache_kwarg

    return generate_cache_kwarg(model)


def test_bad_requests_fail_before_any_work(model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs sampling"):
        run(model_dir, tmp_path / "a", samples=4)
    with pytest.raises(ValueError, match="valid benchmarks"):
        run(model_dir, tmp_path / "a", benchmark="nope")
    with pytest.raises(ValueError, match="takes no option"):
        run(model_dir, tmp_path / "a", subset="x")
    with pytest.raises(ValueError, match="needs retention gates"):
        run(model_dir, tmp_path / "a", policy="trimkv", budget=4)
    with pytest.raises(ValueError, match="needs LocRet retaining heads"):
        run(model_dir, tmp_path / "a", policy="locret", budget=4)
    with pytest.raises(ValueError, match="needs SeerAttention-R AttnGates"):
        run(model_dir, tmp_path / "a", policy="seerattn_r", budget=4)
    run(model_dir, tmp_path / "b", limit=2)
    with pytest.raises(ValueError, match="max_new_tokens: None -> 3"):
        run(model_dir, tmp_path / "b", limit=2, max_new_tokens=3)


def test_cli_parser_has_every_flag_with_help():
    parser = argparse.ArgumentParser()
    runner.add_parser(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    for flag in ("--model", "--benchmark", "--policy", "--budget", "--out", "--limit", "--samples", "--batch-size",
                 "--max-new-tokens", "--buffer-size", "--subset", "--judge-model", "--thinking"):
        assert flag in text
    args = parser.parse_args(["eval", "--model", "m", "--benchmark", "gsm8k", "--out", "o"])
    assert args.func is runner._run_from_args and args.policy == "trimkv"
