"""`trimkv track`: one MLflow run per job with the right tags and metrics; a rerun updates, never duplicates."""

from __future__ import annotations

import json
import shutil

import pytest
from test_report_fixtures import eval_job, gate_run, paper_like, write_json

from trimkv.cli import main as trimkv_main
from trimkv.tracking import JOB_TAG, import_results


def main(argv):
    return trimkv_main(["track", *argv])

pytest.importorskip("mlflow")

EXPERIMENT = "offline"


def client(db):
    from trimkv.tracking import _client

    return _client(db)


def runs_by_job(db):
    c = client(db)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([experiment.experiment_id], max_results=1000)
    by_job = {r.data.tags[JOB_TAG]: r for r in runs}
    assert len(by_job) == len(runs), "two active runs for one job"
    return by_job


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    results = paper_like(tmp_path_factory.mktemp("tracking") / "results")
    (results / "tables").mkdir()
    (results / "tables" / "budget_gsm8k.md").write_text("| a |\n")
    (results / "figures").mkdir()
    (results / "figures" / "budget_gsm8k_m.png").write_bytes(b"\x89PNG fake")
    db = results / "mlflow.db"
    args = ["--results", str(results), "--db", str(db), "--experiment", EXPERIMENT, "--config-hash", "cfg1",
            "--git-sha", "abc123", "--rule", "gates=train_gates"]
    assert main(args) == 0
    first = runs_by_job(db)
    assert main(args) == 0  # the rerun
    return results, db, first, runs_by_job(db)


def test_one_run_per_job_and_rerun_is_idempotent(imported):
    _, _, first, second = imported
    assert len(first) == 17 + 2 + 4 + 1  # eval, gates, bench jobs and the summary
    assert {j: r.info.run_id for j, r in first.items()} == {j: r.info.run_id for j, r in second.items()}
    assert {j: r.data.metrics for j, r in first.items() if j != "summary"} == \
        {j: r.data.metrics for j, r in second.items() if j != "summary"}


def test_tags_params_and_metrics(imported):
    _, _, _, runs = imported
    run = runs["eval/qwen3-tiny/longbench/trimkv/128"]
    tags = run.data.tags
    assert (tags["trimkv.stage"], tags["rule"], tags["model"], tags["benchmark"], tags["policy"], tags["budget"]) \
        == ("eval", "eval", "qwen3-tiny", "longbench", "trimkv", "128")
    assert tags["git_sha"] == "abc123" and tags["config_hash"] == "cfg1" and tags["complete"] == "true"
    assert run.info.run_name == "eval/qwen3-tiny/longbench/trimkv/128"
    m = run.data.metrics
    assert m["score"] == 0.45 and m["ci95_low"] == pytest.approx(0.40) and m["per_category.multi_doc.score"] == 0.35
    assert run.data.params["policy"] == "trimkv" and run.data.params["budget"] == "128"
    assert runs["eval/qwen3-tiny/gsm8k/full/full"].data.tags["budget"] == "full"
    assert runs["eval/qwen3-tiny/gsm8k/streaming/128"].data.tags["complete"] == "false"

    gates = runs["gates/qwen3-tiny-paperloss"]
    assert gates.data.tags["trimkv.stage"] == "gates" and gates.data.tags["rule"] == "train_gates"
    assert gates.data.params["capacity_form"] == "paper" and gates.data.metrics["final.loss"] == 1.0
    bench = runs["bench/Qwen3-4B/trimkv/32768-4"]
    assert bench.data.tags["policy"] == "trimkv" and bench.data.tags["budget"] == "1024"
    assert bench.data.metrics["tokens_per_s"] == 130.5
    assert not any(j.startswith("gates/qwen3-tiny/checkpoints") for j in runs)


def test_curves_become_metric_histories(imported):
    _, db, _, runs = imported
    history = client(db).get_metric_history(runs["gates/qwen3-tiny"].info.run_id, "curve.loss")
    assert sorted((h.step, h.value) for h in history) == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]


def test_summary_run_holds_tables_and_figures(imported):
    _, db, _, runs = imported
    summary = runs["summary"]
    c = client(db)
    assert [a.path for a in c.list_artifacts(summary.info.run_id, "tables")] == ["tables/budget_gsm8k.md"]
    assert [a.path for a in c.list_artifacts(summary.info.run_id, "figures")] == ["figures/budget_gsm8k_m.png"]
    assert summary.data.metrics["jobs.eval"] == 17


def test_changed_jobs_update_their_run(imported, tmp_path):
    results, db, _, before = imported
    results = shutil.copytree(results, tmp_path / "results")
    db = results / "mlflow.db"
    common = {"results": results, "db": db, "experiment": EXPERIMENT, "git_sha": "def456"}
    gate_run(results, "resumed", "base", steps=3, max_steps=5)  # a training job stopped at step 3 of 5
    assert import_results(**common)["created"] == 1
    first = runs_by_job(db)["gates/resumed"]
    assert first.data.tags["complete"] == "false"

    # an eval that finished since: same params, new score -> the same run, updated
    eval_job(results, "qwen3-tiny", "gsm8k", "streaming", 128, 0.42)
    # the resumed training: its curves grow -> the same run, the new points appended
    gate_run(results, "resumed", "base", steps=5, max_steps=5)
    # a job rerun with another setting: a param changes value -> a fresh run replaces the old one
    params_file = results / "eval" / "llama-tiny" / "gsm8k" / "trimkv" / "64" / "params.json"
    params = json.loads(params_file.read_text())
    write_json(params_file, {**params, "buffer_size": 64})
    counts = import_results(**common)
    assert (counts["created"], counts["updated"], counts["replaced"], counts["unchanged"]) == (0, 2, 1, 21)
    after = runs_by_job(db)
    assert len(after) == len(before) + 1
    streaming = after["eval/qwen3-tiny/gsm8k/streaming/128"]
    assert streaming.info.run_id == before["eval/qwen3-tiny/gsm8k/streaming/128"].info.run_id
    assert streaming.data.metrics["score"] == 0.42 and streaming.data.tags["complete"] == "true"
    assert streaming.data.tags["git_sha"] == "def456"
    resumed = after["gates/resumed"]
    assert resumed.info.run_id == first.info.run_id and resumed.data.tags["complete"] == "true"
    history = client(db).get_metric_history(resumed.info.run_id, "curve.loss")
    assert sorted(h.step for h in history) == [1, 2, 3, 4, 5]  # each step once
    replaced = after["eval/llama-tiny/gsm8k/trimkv/64"]
    assert replaced.info.run_id != before["eval/llama-tiny/gsm8k/trimkv/64"].info.run_id
    assert replaced.data.params["buffer_size"] == "64"
    assert import_results(**common)["unchanged"] == 24


def test_one_writer_at_a_time(tmp_path):
    import fcntl

    results = tmp_path / "results"
    eval_job(results, "m", "gsm8k", "trimkv", 64, 0.5)
    db = results / "mlflow.db"
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another `trimkv track` is writing"):
            import_results(results, db, EXPERIMENT)
