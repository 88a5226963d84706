"""`python -m trimkv track`: import every job's metrics.json / params.json under results/ into MLflow.

One run per job directory (a directory holding metrics.json; training checkpoints are left out), in one
experiment of a SQLite store (`sqlite:///<db>`), browsable with
`mlflow ui --backend-store-uri sqlite:///results/mlflow.db`:
- tags: `trimkv.job` (the job's path under results/, the run's key), `trimkv.stage` (gates, eval, bench, or
  the first directory of any other job), `rule` (the stage, or the name given by --rule STAGE=NAME), `model`,
  `benchmark`, `policy`, `budget` ("full" for the full cache) where they apply, `git_sha`, `config_hash`,
  `complete`, and `trimkv.content_sha` (sha256 of the job's two files);
- params: params.json flattened (nested keys joined by "."), values as strings;
- metrics: every number in metrics.json (nested keys joined by "."; booleans as 0/1; the copy of the params
  inside an eval's metrics.json is left out); a gate run's per-step curves ("curves": {"step": [...],
  "loss": [...]}) become metric histories over those steps.
A summary run (`trimkv.job` = "summary") holds results/tables and results/figures as artifacts (under
`tables/` and `figures/`) and the number of jobs per stage.

Idempotent: a job whose files have not changed is skipped; a changed job updates its run in place (new
metric values, tags, added params, curve steps beyond those logged). When an update cannot be expressed in
place (a param changed value, or an already-logged curve point changed), the old run is deleted and a new
one made, so each job always has exactly one active run. Artifacts go to --artifact-root (default: beside
the database). Only this one process may write the database: a lock file beside it refuses a second writer,
so parallel cluster jobs never write SQLite at once (they write JSON; one local rule runs this).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trimkv.report.collect import FULL, METRICS, PARAMS, job_files, job_params, model_label, read_json

JOB_TAG = "trimkv.job"
STAGE_TAG = "trimkv.stage"
CONTENT_TAG = "trimkv.content_sha"
T0_TAG = "trimkv.t0"  # the anchor of curve timestamps, so re-logged points are recognised as the same
SUMMARY_JOB = "summary"
MAX_PARAM = 6000  # MLflow's limits
MAX_KEY = 250
BATCH = 900


# ---- command line ----

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("track", help="import every job's metrics.json/params.json into MLflow (SQLite)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"), help="results directory (default: results)")
    p.add_argument("--db", type=Path, default=Path("results/mlflow.db"),
                   help="SQLite database file (default: results/mlflow.db)")
    p.add_argument("--experiment", default="trimkv", help="MLflow experiment, e.g. the preset's name "
                   "(default: trimkv)")
    p.add_argument("--config-hash", default=None, help="hash of the workflow config, set as tag config_hash")
    p.add_argument("--git-sha", default=None, help="code version tag git_sha (default: `git rev-parse HEAD` "
                   "of the current directory, + '-dirty' with uncommitted changes)")
    p.add_argument("--tables", type=Path, default=None, help="tables to attach to the summary run "
                   "(default: RESULTS/tables, if present)")
    p.add_argument("--figures", type=Path, default=None, help="figures to attach to the summary run "
                   "(default: RESULTS/figures, if present)")
    p.add_argument("--artifact-root", type=Path, default=None,
                   help="where a new experiment stores artifacts (default: mlartifacts/ beside --db)")
    p.add_argument("--rule", action="append", default=[], metavar="STAGE=NAME",
                   help="tag runs of STAGE with rule=NAME (repeatable; default: rule=STAGE)")
    p.set_defaults(func=_run_from_args)
    return p


def _run_from_args(args) -> int:
    rules = {}
    for item in args.rule:
        stage, sep, name = item.partition("=")
        if not sep or not stage or not name:
            raise ValueError(f"--rule expects STAGE=NAME, got {item!r}")
        rules[stage] = name
    counts = import_results(args.results, args.db, args.experiment, config_hash=args.config_hash,
                            git_sha=args.git_sha, tables=args.tables, figures=args.figures,
                            artifact_root=args.artifact_root, rules=rules)
    print(f"{args.db}: experiment {args.experiment!r}: {counts['created']} runs created, {counts['updated']} "
          f"updated, {counts['replaced']} replaced, {counts['unchanged']} unchanged; {counts['jobs']} jobs")
    return 0


# ---- what a job becomes ----

def current_git_sha(directory: Path | str = ".") -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _key(text: str) -> str:
    """A valid MLflow key: letters, digits, _ - . / and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)[:MAX_KEY]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts) -> {"a.b.c": leaf}."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            name = (f"{v['policy']}.ctx{v['context']}.bs{v['batch']}"  # bench measurements
                    if all(k in v for k in ("policy", "context", "batch")) else str(i))
            out.update(flatten(v, f"{prefix}.{name}" if prefix else name))
        return out
    return {prefix: value}


def job_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    metrics = {k: v for k, v in metrics.items() if k not in ("params", "curves")}
    ci = metrics.pop("ci95", None)
    if isinstance(ci, list) and len(ci) == 2:
        metrics.update(ci95_low=ci[0], ci95_high=ci[1])
    for k, v in flatten(metrics).items():
        if isinstance(v, (bool, int, float)):  # booleans as 0/1
            out[_key(k)] = float(v)
    return out


def job_param_values(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in flatten(params).items():
        text = v if isinstance(v, str) else json.dumps(v)
        out[_key(k)] = text[:MAX_PARAM]
    return out


def job_curves(metrics: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    curves = metrics.get("curves") or {}
    if not isinstance(curves, dict):
        return {}
    steps = curves.get("step")
    out = {}
    for k, values in curves.items():
        if k == "step" or not isinstance(values, list):
            continue
        points = []
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                points.append((int(steps[i]) if steps and i < len(steps) else i + 1, float(v)))
        if points:
            out[_key(f"curve.{k}")] = points
    return out


def job_tags(stage: str, parts: tuple[str, ...], metrics: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """model / benchmark / policy / budget for the stages that have them (parts: the job path under results/)."""
    tags: dict[str, Any] = {}
    if stage == "eval":
        nested = len(parts) == 5  # eval/<model>/<benchmark>/<policy>/<budget>
        tags["model"] = parts[1] if nested else model_label(params.get("model", ""))
        tags["benchmark"] = metrics.get("benchmark") or params.get("benchmark")
        tags["policy"] = parts[3] if nested else params.get("policy")
        tags["budget"] = FULL if params.get("budget") is None else params["budget"]
    elif stage == "gates":
        tags["model"] = "/".join(parts[1:]) or parts[0]
        tags["base_model"] = params.get("model")
        tags["budget"] = params.get("memory_size")
    elif stage == "bench":
        measure = metrics if "results" not in metrics else {}
        tags["model"] = model_label(measure.get("model") or params.get("model") or (parts[1] if len(parts) > 1
                                                                                    else ""))
        tags["policy"] = measure.get("policy") or params.get("policy")
        budget = measure.get("budget", params.get("budget", params.get("memory_size")))
        tags["budget"] = FULL if budget is None and tags["policy"] == "full" else budget
        for k in ("context", "batch"):
            tags[k] = measure.get(k, params.get(k))
    elif params.get("model"):
        tags["model"] = model_label(params["model"])
    complete = metrics.get("complete", (metrics.get("final") or {}).get("complete"))
    if complete is not None:
        tags["complete"] = str(bool(complete)).lower()
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def content_sha(job: Path) -> str:
    h = hashlib.sha256()
    for name in (METRICS, PARAMS):
        path = job / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()


# ---- the import ----

@contextmanager
def _single_writer(db: Path):
    import fcntl

    with open(f"{db}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `trimkv track` is writing {db} (lock {db}.lock); only one writer at a "
                             "time") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client(db: Path):
    """An MlflowClient on the SQLite file, without telemetry or the INFO lines of creating the tables."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):  # after the import: mlflow sets its loggers up when imported
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")


def _experiment(client, name: str, artifact_root: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _runs_by_job(client, experiment_id: str) -> dict[str, list]:
    """Every active run of the experiment that carries a job tag, newest first, by job (one query per page)."""
    by_job: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` != ''", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        for run in page:
            by_job.setdefault(run.data.tags[JOB_TAG], []).append(run)
        token = page.token
        if not token:
            return by_job


def _log(client, run_id: str, metrics: dict[str, float], params: dict[str, str], tags: dict[str, str],
         timestamp: int, curves: dict[str, list[tuple[int, float]]], t0: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    entries = [Metric(k, v, timestamp, 0) for k, v in metrics.items()]
    entries += [Metric(k, v, t0 + step, step) for k, points in curves.items() for step, v in points]
    param_list = [Param(k, v) for k, v in params.items()]
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    for i in range(0, len(entries), BATCH):
        client.log_batch(run_id, metrics=entries[i:i + BATCH])
    for i in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[i:i + 100])
    for i in range(0, len(tag_list), 100):
        client.log_batch(run_id, tags=tag_list[i:i + 100])


def _logged_curves(client, run_id: str, curves) -> dict[str, dict[int, float]] | None:
    """Already-logged curve points; None when a logged point differs from the new one (not an extension)."""
    logged = {}
    for key, points in curves.items():
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for step, value in points:
            if step in history and not _same(history[step], value):
                return None
        logged[key] = history
    return logged


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _mtime_ms(path: Path) -> int:
    return int(path.stat().st_mtime * 1000) if path.exists() else int(time.time() * 1000)


def _sync_run(client, experiment_id: str, runs: list, job: str, metrics, params, tags, curves, start: int, end: int,
              counts: dict[str, int]) -> str:
    """Create, update, replace or leave the one run of `job` (`runs`: its active runs, newest first)."""
    for extra in runs[1:]:  # heal duplicates, e.g. from an interrupted import
        client.delete_run(extra.info.run_id)
    run = runs[0] if runs else None
    if run is not None and run.data.tags.get(CONTENT_TAG) == tags[CONTENT_TAG]:
        counts["unchanged"] += 1
        return run.info.run_id
    logged = None  # curve points the run already has; None: the run cannot be updated in place
    if run is not None:
        if all(run.data.params.get(k, v) == v for k, v in params.items()):
            logged = _logged_curves(client, run.info.run_id, curves)
        if logged is None:
            client.delete_run(run.info.run_id)
    if logged is None:
        counts["replaced" if run is not None else "created"] += 1
        t0, logged = start, {}
        # the content tag comes last (with _log's tags): an import killed half-way is redone, not skipped
        first_tags = {**{k: v for k, v in tags.items() if k != CONTENT_TAG}, T0_TAG: str(start)}
        run = client.create_run(experiment_id, start_time=start, tags=first_tags, run_name=job)
    else:
        counts["updated"] += 1
        t0 = int(run.data.tags.get(T0_TAG, start))
    run_id = run.info.run_id
    new_points = {k: [(s, v) for s, v in points if s not in logged.get(k, {})] for k, points in curves.items()}
    _log(client, run_id, metrics, params, tags, end, new_points, t0)
    client.set_terminated(run_id, status="FINISHED", end_time=end)
    return run_id


def import_results(results: Path, db: Path, experiment: str, config_hash: str | None = None,
                   git_sha: str | None = None, tables: Path | None = None, figures: Path | None = None,
                   artifact_root: Path | None = None, rules: dict[str, str] | None = None) -> dict[str, int]:
    """Import (or update) one MLflow run per job under `results`, plus the summary run; returns counts."""
    results, db = Path(results), Path(db)
    if not results.is_dir():
        raise ValueError(f"--results {results}: no such directory")
    db.parent.mkdir(parents=True, exist_ok=True)
    artifact_root = Path(artifact_root) if artifact_root is not None else db.parent / "mlartifacts"
    tables = Path(tables) if tables is not None else results / "tables"
    figures = Path(figures) if figures is not None else results / "figures"
    skip = {p.resolve() for p in (tables, figures, artifact_root)}
    files = [f for f in job_files(results) if not any(d in f.resolve().parents for d in skip)]
    common = {"git_sha": git_sha or current_git_sha(), "config_hash": config_hash or "unknown"}
    rules = rules or {}
    counts = {"created": 0, "updated": 0, "replaced": 0, "unchanged": 0, "jobs": 0}
    per_stage: dict[str, int] = {}
    with _single_writer(db):
        client = _client(db)
        experiment_id = _experiment(client, experiment, artifact_root)
        existing = _runs_by_job(client, experiment_id)
        for file in files:
            job = file.parent.relative_to(results)
            parts = job.parts or (results.name,)
            stage = parts[0] if len(parts) > 1 else "results"
            metrics = read_json(file)
            if not isinstance(metrics, dict):
                raise ValueError(f"{file}: expected a JSON object")  # noqa: TRY004 (bad input: one-line error)
            params = job_params(file, metrics)
            tags = {JOB_TAG: job.as_posix(), STAGE_TAG: stage, "rule": rules.get(stage, stage), **common,
                    **job_tags(stage, parts, metrics, params), CONTENT_TAG: content_sha(file.parent)}
            key = job.as_posix()
            _sync_run(client, experiment_id, existing.get(key, []), key, job_metrics(metrics),
                      job_param_values(params), tags, job_curves(metrics), _mtime_ms(file.with_name(PARAMS)),
                      _mtime_ms(file), counts)
            per_stage[stage] = per_stage.get(stage, 0) + 1
            counts["jobs"] += 1
        _summary(client, experiment_id, existing.get(SUMMARY_JOB, []), per_stage, common, rules, tables, figures)
    return counts


def _summary(client, experiment_id: str, runs: list, per_stage: dict[str, int], common: dict[str, str], rules,
             tables: Path, figures: Path) -> str:
    for extra in runs[1:]:
        client.delete_run(extra.info.run_id)
    tags = {JOB_TAG: SUMMARY_JOB, STAGE_TAG: "report", "rule": rules.get("report", "report"), **common}
    now = int(time.time() * 1000)
    run_id = runs[0].info.run_id if runs else client.create_run(experiment_id, start_time=now, tags=tags,
                                                                run_name=SUMMARY_JOB).info.run_id
    _log(client, run_id, {f"jobs.{k}": float(v) for k, v in per_stage.items()}, {}, tags, now, {}, now)
    for directory, name in ((tables, "tables"), (figures, "figures")):
        if directory.is_dir() and any(directory.iterdir()):
            client.log_artifacts(run_id, str(directory), artifact_path=name)
    client.set_terminated(run_id, status="FINISHED", end_time=now)
    return run_id
