"""Fake but schema-correct job outputs (eval, gates, bench) for the report and tracking tests (helpers, and a
check that they read back)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def eval_job(root: Path, model: str, benchmark: str, policy: str, budget: int | None, score: float,
             categories: dict[str, float] | None = None, complete: bool = True, gates: str | None = None) -> Path:
    """results/eval/<model>/<benchmark>/<policy>/<budget>/ as trimkv.eval.runner writes it."""
    job = root / "eval" / model / benchmark / policy / ("full" if budget is None else str(budget))
    params = {"model": gates or f"resources/models/{model}", "revision": None, "benchmark": benchmark,
              "subset": None, "policy": policy, "budget": budget, "buffer_size": 128, "sink": 0, "window": 0,
              "samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": None, "max_input_tokens": None,
              "thinking": False, "seed": 0, "batch_size": 1, "dtype": "auto", "limit": None, "judge_model": None,
              "data_dir": f"resources/data/{benchmark}", "data_revision": "abc123", "dataset": f"org/{benchmark}"}
    categories = categories or {"": score}
    metrics = {"benchmark": benchmark, "score": score, "ci95": [max(0.0, score - 0.05), min(1.0, score + 0.05)],
               "ci_method": "percentile bootstrap over problems, 1000 resamples, seed 0", "n_problems": 20,
               "n_rows": 20 if complete else 12, "expected_rows": 20, "complete": complete,
               "samples_per_problem": 1,
               "per_category": {c: {"score": s, "n": 10} for c, s in categories.items()},
               "generated_tokens_mean": 100.0, "cache_bytes_mean": 4096.0 * (budget or 1000),
               "cache_bytes_max": 8192 * (budget or 1000), "benchmark_metrics": {"exact": score},
               "params": params}
    write_json(job / "params.json", params)
    write_json(job / "metrics.json", metrics)
    return job


def gate_run(root: Path, name: str, base: str, capacity_form: str = "released", capacity_weight: float = 1.0,
             steps: int = 3, loss0: float = 2.0, max_steps: int | None = None) -> Path:
    """results/gates/<name>/ as trimkv.train.trainer writes it (params = TrainConfig + extras)."""
    job = root / "gates" / name
    max_steps = max_steps or steps
    params = {"model": base, "data": ["resources/data/train.jsonl"], "out": str(job), "memory_size": 16,
              "max_steps": max_steps, "capacity_form": capacity_form, "capacity_weight": capacity_weight,
              "kl_weight": 0.5, "ntp_weight": 0.5, "lr": 2e-4, "world_size": 1,
              "gate_config": {"intermediate_size": 512, "bias_init": 10.0}}
    history = [{"step": s, "loss": loss0 / s, "kl": 0.1 / s, "ntp": 1.5 / s, "capacity": 0.2 / s,
                "beta_mean": 0.9, "lr": 2e-4, "grad_norm": 1.0, "tokens": 512, "tokens_per_s": 1000.0,
                "seconds": 0.5} for s in range(1, steps + 1)]
    curves = {k: [h[k] for h in history] for k in history[0]}
    final = {**history[-1], "steps": steps, "max_steps": max_steps, "train_tokens": 512 * steps,
             "train_seconds": 0.5 * steps, "complete": steps == max_steps}
    write_json(job / "params.json", params)
    write_json(job / "metrics.json", {"final": final, "curves": curves})
    (job / "checkpoints" / "step-00000001").mkdir(parents=True, exist_ok=True)
    write_json(job / "checkpoints" / "step-00000001" / "metrics.json", {"not": "a job"})
    return job


def bench_job(root: Path, model: str, policy: str, budget: int | None, context: int, batch: int,
              tokens_per_s: float | None, oom: bool = False) -> Path:
    """results/bench/<model>/<policy>/<context>-<batch>/ with the keys trimkv.report.collect documents."""
    job = root / "bench" / model / policy / f"{context}-{batch}"
    metrics = {"policy": policy, "budget": budget, "context": context, "batch": batch, "new_tokens": 1024,
               "tokens_per_s": tokens_per_s, "decode_s": None if oom else 1024 * batch / tokens_per_s,
               "peak_memory_bytes": None if oom else 2**30 * (10 + batch), "oom": oom, "device": "NVIDIA H200"}
    write_json(job / "params.json", {"model": f"Qwen/{model}", "memory_size": budget})
    write_json(job / "metrics.json", metrics)
    return job


def paper_like(root: Path) -> Path:
    """A small results/ tree: two models, two benchmarks (one with categories), holes, gates and bench."""
    for model in ("qwen3-tiny", "llama-tiny"):
        eval_job(root, model, "gsm8k", "full", None, 0.80)
        for budget, s in ((64, 0.50), (128, 0.70), (256, 0.78)):
            eval_job(root, model, "gsm8k", "trimkv", budget, s)
        for budget, s in ((64, 0.30), (256, 0.60)):  # 128 missing: a hole
            eval_job(root, model, "gsm8k", "snapkv", budget, s)
    eval_job(root, "qwen3-tiny", "gsm8k", "streaming", 128, 0.40, complete=False)
    cats = {"single_doc": 0.6, "multi_doc": 0.4}
    eval_job(root, "qwen3-tiny", "longbench", "full", None, 0.5, categories=cats)
    eval_job(root, "qwen3-tiny", "longbench", "trimkv", 128, 0.45, categories={"single_doc": 0.55, "multi_doc": 0.35})
    eval_job(root, "qwen3-tiny", "longbench", "h2o", 128, 0.30, categories={"single_doc": 0.30})
    gate_run(root, "qwen3-tiny", "resources/models/qwen3-tiny")
    gate_run(root, "qwen3-tiny-paperloss", "resources/models/qwen3-tiny", capacity_form="paper", loss0=3.0)
    eval_job(root, "qwen3-tiny-paperloss", "gsm8k", "trimkv", 128, 0.65,
             gates=str(root / "gates" / "qwen3-tiny-paperloss"))
    bench_job(root, "Qwen3-4B", "full", None, 32768, 4, 68.4)
    bench_job(root, "Qwen3-4B", "trimkv", 1024, 32768, 4, 130.5)
    bench_job(root, "Qwen3-4B", "trimkv", 1024, 16384, 8, 279.9)
    bench_job(root, "Qwen3-4B", "full", None, 16384, 8, None, oom=True)
    return root


def test_the_fixtures_read_back_as_jobs(tmp_path):
    from trimkv.report.collect import load_bench, load_eval, load_gates

    results = paper_like(tmp_path / "results")
    evals = load_eval(results / "eval")
    assert len(evals) == 17 and {e.benchmark for e in evals} == {"gsm8k", "longbench"}
    assert [r.label for r in load_gates(results / "gates")] == ["qwen3-tiny", "qwen3-tiny-paperloss"]  # no checkpoints
    assert len(load_bench(results / "bench")) == 4
