"""`python -m trimkv select`: the best training run by its validation score, copied where evaluation reads."""

from __future__ import annotations

import json

import pytest

from trimkv.cli import main
from trimkv.train.select import select


def make_run(root, seed, score):
    run = root / "seeds" / str(seed)
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "trimkv_gates.safetensors").write_bytes(bytes([seed]) * 8)
    (run / "metrics.json").write_text(json.dumps({"final": {"loss": 1.0 + seed}}))
    (run / "params.json").write_text(json.dumps({"seed": seed}))
    scores = root / "validation" / str(seed) / "metrics.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"score": score}))
    return run, scores


def test_keeps_the_best_validation_score_first_on_ties(tmp_path):
    runs, scores = zip(*(make_run(tmp_path, seed, score) for seed, score in [(0, 0.5), (1, 0.8), (2, 0.8)]))
    out = tmp_path / "kept"
    record = select(list(runs), list(scores), out)
    assert record["seed"] == 1 and record["validation_score"] == 0.8 and record["kept"] == str(runs[1])
    assert (out / "trimkv_gates.safetensors").read_bytes() == bytes([1]) * 8
    assert json.loads((out / "metrics.json").read_text()) == {"final": {"loss": 2.0}}
    assert not (out / "checkpoints").exists()  # the run's files, not its checkpoints
    saved = json.loads((out / "selection.json").read_text())
    assert [(r["seed"], r["validation_score"]) for r in saved["runs"]] == [(0, 0.5), (1, 0.8), (2, 0.8)]


def test_one_run_needs_no_score_and_the_cli(tmp_path, capsys):
    run, scores = make_run(tmp_path, 3, 0.1)
    out = tmp_path / "kept"
    assert main(["select", "--runs", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "selection.json").read_text())["seed"] == 3
    assert "kept" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 runs need 2 validation scores"):
        select([run, run], [scores], out)


def test_report_names_the_kept_seed(tmp_path):
    from trimkv.report.collect import load_gates

    gates = tmp_path / "gates"
    runs, scores = zip(*(make_run(gates / "tiny", seed, score) for seed, score in [(0, 0.2), (1, 0.9)]))
    select(list(runs), list(scores), gates / "tiny")
    labels = {run.label: run.final["loss"] for run in load_gates(gates) if "validation" not in run.label}
    assert labels == {"tiny (kept: seed 1)": 2.0, "tiny/seeds/0": 1.0, "tiny/seeds/1": 2.0}
