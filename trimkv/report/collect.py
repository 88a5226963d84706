"""Read the jobs' JSON outputs into plain records; everything in report/ and tracking.py starts here.

Three kinds of job, each a directory with `metrics.json` (and usually `params.json`) beside its outputs:

- eval  `results/eval/<model>/<benchmark>/<policy>/<budget>/`, written by `trimkv.eval.runner`:
        metrics "score", "ci95" [low, high], "per_category" {name: {"score", "n"}}, "n_problems", "n_rows",
        "complete", "generated_tokens_mean", "cache_bytes_mean", "params" {model, benchmark, policy,
        budget (null for the full cache), ...}. Scores are fractions in [0, 1].
- gates `results/gates/<run>/`, written by `trimkv.train.trainer`: metrics {"final": {loss, kl, ntp,
        capacity, beta_mean, steps, ...}, "curves": {"step": [...], "loss": [...], ...}}; params.json holds
        the TrainConfig (model = the base model, memory_size, capacity_form, capacity_weight, kl_weight,
        ntp_weight, ...). `lambda_cap` is read as an alias of `capacity_weight`.
- bench `results/bench/**/metrics.json`: one measurement, or {"results": [measurement, ...]}. A measurement
        (BENCH_KEYS; a key missing from it is looked up in params.json beside it, then in metrics["params"]):
          policy         str    eviction policy                                         (required)
          context        int    prompt tokens                                           (required)
          batch          int    sequences decoded together                              (required)
          tokens_per_s   float  generated tokens per second, whole batch                (required unless oom)
          model          str    model label (default: the directory under bench/)
          budget         int|null  KV budget M (null: full cache); alias memory_size
          new_tokens     int    tokens generated per sequence
          decode_s, prefill_s  float  seconds of the decode loop / of the prefill
          peak_memory_bytes    int    peak accelerator memory of the run
          bandwidth_fraction   float  fraction of the memory-bandwidth bound reached
          oom            bool   the run ran out of memory (shown as "OOM")
          device         str    e.g. "NVIDIA H200"

Labels: an eval job's model and policy labels are its directory names when it sits at
`<model>/<benchmark>/<policy>/<budget>` under the eval directory (so a variant such as `trimkv-sink4`
gets its own row), else the params' values. The budget always comes from params.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.json"
PARAMS = "params.json"
FULL = "full"  # the label of the unbounded cache's budget
# Row order of policies in tables and legends: the full cache first, the method last (as in the paper).
POLICY_ORDER = ("full", "streaming", "h2o", "snapkv", "tova", "keydiff", "knorm", "random", "rkv", "seerattn",
                "locret", "trimkv")
# Policies whose budget limits the keys a decode step reads, not what the cache stores: their memory is the full
# cache's (policies with `stores_all`), so tables say so and do not rank them against memory-bounded policies.
FULL_MEMORY_POLICIES = ("seerattn_r",)
BENCH_REQUIRED = ("policy", "context", "batch")
BENCH_KEYS = BENCH_REQUIRED + ("tokens_per_s", "model", "budget", "new_tokens", "decode_s", "prefill_s",
                               "peak_memory_bytes", "bandwidth_fraction", "oom", "device")
# Gate-training options that define the loss (params.json keys), with their table headers.
LOSS_KEYS = {"capacity_form": "capacity form", "capacity_weight": "lambda_cap", "kl_weight": "KL weight",
             "ntp_weight": "NTP weight", "memory_size": "M"}
PARAM_ALIASES = {"lambda_cap": "capacity_weight"}


@dataclass
class EvalResult:
    path: Path
    model: str
    benchmark: str
    policy: str
    budget: int | None
    score: float
    ci95: tuple[float, float] | None
    per_category: dict[str, float]
    metrics: dict[str, Any]
    params: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.metrics.get("complete", True))


@dataclass
class GateRun:
    path: Path
    label: str  # directory under the gates directory
    base_model: str
    final: dict[str, Any]
    curves: dict[str, list]
    params: dict[str, Any]


@dataclass
class BenchResult:
    path: Path
    model: str
    policy: str
    budget: int | None
    context: int
    batch: int
    tokens_per_s: float | None
    oom: bool
    values: dict[str, Any] = field(default_factory=dict)  # the whole measurement


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def job_files(root: Path | None) -> list[Path]:
    """Every metrics.json under root (sorted), leaving out training checkpoints."""
    if root is None or not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).rglob(METRICS) if "checkpoints" not in p.relative_to(root).parts)


def job_params(metrics_file: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """params.json beside metrics.json, completed by the copy the eval runner embeds in metrics.json."""
    params = dict(metrics.get("params") or {}) if isinstance(metrics, dict) else {}
    beside = metrics_file.with_name(PARAMS)
    if beside.is_file():
        params.update(read_json(beside))
    for alias, name in PARAM_ALIASES.items():
        if alias in params and name not in params:
            params[name] = params[alias]
    return params


def budget_label(budget: int | None) -> str:
    return FULL if budget is None else str(budget)


def policy_key(policy: str) -> tuple:
    """Sort key: the paper's order for known policies (variants next to their base), unknown ones by name."""
    base = policy.split("-")[0].split("_")[0]
    rank = POLICY_ORDER.index(base) if base in POLICY_ORDER else len(POLICY_ORDER) - 1  # before trimkv
    return rank, policy != base, policy


def budget_key(budget: int | None) -> float:
    return float("inf") if budget is None else float(budget)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_eval(root: Path | None) -> list[EvalResult]:
    results: dict[tuple, EvalResult] = {}
    for file in job_files(root):
        metrics = read_json(file)
        if not isinstance(metrics, dict) or "score" not in metrics:
            warn(f"{file} has no 'score'; not an evaluation result, skipped")
            continue
        params = job_params(file, metrics)
        parts = file.parent.relative_to(root).parts
        nested = len(parts) == 4  # <model>/<benchmark>/<policy>/<budget>
        model = parts[0] if nested else Path(str(params.get("model", "?"))).name
        benchmark = str(metrics.get("benchmark") or params.get("benchmark") or (parts[1] if nested else "?"))
        policy = parts[2] if nested else str(params.get("policy", "?"))
        budget = params.get("budget")
        ci = metrics.get("ci95")
        result = EvalResult(
            path=file.parent, model=model, benchmark=benchmark, policy=policy,
            budget=None if budget is None else int(budget), score=float(metrics["score"]),
            ci95=(float(ci[0]), float(ci[1])) if ci else None,
            per_category={str(c): float(v["score"] if isinstance(v, dict) else v)
                          for c, v in (metrics.get("per_category") or {}).items()},
            metrics=metrics, params=params)
        key = (result.model, result.benchmark, result.policy, result.budget)
        if key in results:
            raise ValueError(f"two evaluation jobs for one cell {key}: {results[key].path} and {result.path}")
        results[key] = result
    return list(results.values())


def load_gates(root: Path | None) -> list[GateRun]:
    runs = []
    for file in job_files(root):
        metrics = read_json(file)
        if not isinstance(metrics, dict) or not isinstance(metrics.get("final"), dict):
            warn(f"{file} has no 'final' section; not a gate training result, skipped")
            continue
        params = job_params(file, metrics)
        label = file.parent.relative_to(root).as_posix()
        label = Path(root).name if label == "." else label
        selection = file.with_name("selection.json")  # a run kept among seeds by `trimkv select`
        kept = read_json(selection) if selection.is_file() else {}
        if len(kept.get("runs", [])) > 1:
            label += f" (kept: seed {kept.get('seed')})"
        runs.append(GateRun(path=file.parent, label=label, base_model=str(params.get("model", label)),
                            final=metrics["final"], curves=metrics.get("curves") or {}, params=params))
    return runs


def load_bench(root: Path | None) -> list[BenchResult]:
    results = []
    for file in job_files(root):
        metrics = read_json(file)
        params = job_params(file, metrics)
        entries = metrics.get("results") if isinstance(metrics, dict) and "results" in metrics else [metrics]
        parts = file.parent.relative_to(root).parts
        for i, entry in enumerate(entries):
            where = f"{file}" + (f" results[{i}]" if len(entries) > 1 else "")
            values = {**{k: v for k, v in params.items() if k in BENCH_KEYS or k == "memory_size"}, **entry}
            if "budget" not in values and "memory_size" in values:
                values["budget"] = values["memory_size"]
            missing = [k for k in BENCH_REQUIRED if values.get(k) is None]
            oom = bool(values.get("oom", False))
            if not oom and values.get("tokens_per_s") is None:
                missing.append("tokens_per_s")
            if missing:
                warn(f"{where} lacks {', '.join(missing)}; skipped (expected keys: {', '.join(BENCH_KEYS)})")
                continue
            budget = values.get("budget")
            results.append(BenchResult(
                path=file.parent, model=model_label(values.get("model") or (parts[0] if parts else "?")),
                policy=str(values["policy"]), budget=None if budget is None else int(budget),
                context=int(values["context"]), batch=int(values["batch"]),
                tokens_per_s=None if values.get("tokens_per_s") is None else float(values["tokens_per_s"]),
                oom=oom, values=values))
    return results


def model_label(path_or_id: str) -> str:
    return Path(str(path_or_id).rstrip("/")).name
