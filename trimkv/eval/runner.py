"""`python -m trimkv eval`: generate with a bounded KV cache on a benchmark and score, resumably.

Output directory:
- `params.json`   what was run (model, benchmark, policy, budget, decoding, data revision); a rerun
                  into the same directory with different generation settings is refused;
- `samples.jsonl` one line per (sample id, sample index): output, extracted answer, score, generated
                  tokens, cache bytes per sequence, plus the scorer's extra fields. Lines are appended
                  and fsynced a batch at a time; on restart the finished (id, sample) pairs are skipped
                  and a half-written last line is dropped;
- `metrics.json`  computed from samples.jsonl alone (so a resumed run gives the same file as an
                  uninterrupted one): the mean of per-problem means (pass@1 when several samples per
                  problem), a 95% bootstrap CI over problems (1000 resamples, seed 0), per-category
                  scores, token and memory statistics, and the benchmark's own summary numbers.

Generation: prompts are rendered by the benchmark, sorted by (max new tokens, length) and batched
with left padding; each batch gets a fresh cache from `trimkv.make_cache(policy, budget, buffer)`.
Sampled decoding is seeded per batch from --seed and the batch's first (id, sample). Multi-turn
benchmarks (SCBench) run each conversation on one cache, batch size 1: turn k+1 continues from the
cache state after turn k's prompt plus gold answer; the answer itself is generated on a copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, Sample, get_benchmark

BOOTSTRAP_RESAMPLES = 1000
# params that change what is generated: a rerun into the same directory must match them
GENERATION_KEYS = ("model", "revision", "benchmark", "subset", "policy", "budget", "buffer_size", "sink", "window",
                   "prefill_chunk", "samples", "temperature", "top_p", "max_new_tokens", "max_input_tokens",
                   "thinking", "seed", "dtype", "judge_model")  # not limit or batch size: a rerun may extend or re-batch a run


@dataclass
class Job:
    sample: Sample
    index: int  # sample index (0 .. samples-1) for pass@1 over several generations
    ids: list[int]
    max_new_tokens: int

    @property
    def key(self) -> tuple[str, int]:
        return self.sample.id, self.index


# ---- command line ----

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a model with a bounded KV cache on a benchmark (resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trimkv gate checkpoint (ours or upstream), its Hub id, or a plain "
                   "Hugging Face causal LM (for policies without gates)")
    p.add_argument("--benchmark", required=True, help="benchmark name (see trimkv.eval.BENCHMARKS)")
    p.add_argument("--policy", default="trimkv", help="eviction policy (see trimkv.POLICIES; default: trimkv)")
    p.add_argument("--budget", type=int, default=None, help="KV budget M: tokens kept per layer and KV head "
                   "(default: the checkpoint's training value; ignored by the full policy)")
    p.add_argument("--buffer-size", type=int, default=None,
                   help="tokens added beyond the budget before compressing back (default: checkpoint's, else 128)")
    p.add_argument("--sink", type=int, default=None, help="always keep the first N tokens (default: the policy's)")
    p.add_argument("--window", type=int, default=0, help="always keep the last N tokens")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="run long prompts in chunks of N tokens, evicting after each (bounded prefill memory)")
    p.add_argument("--out", type=Path, required=True, help="output directory (samples.jsonl, metrics.json, params.json)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data written by `trimkv data fetch` (default: resources/data/<benchmark>)")
    p.add_argument("--subset", default=None, help="benchmark part(s), comma-separated: LongBench tasks, SCBench subsets, "
                   "LongProc <task>_<len>, LongMemEval s|m|oracle, synthetic's split test|validation "
                   "(default: the paper's set; synthetic: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems (per task/subset)")
    p.add_argument("--samples", type=int, default=None, help="generations per problem for pass@1 (default: paper's)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences generated together (left padding; default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the benchmark's generation length")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="cut longer prompts in the middle to this many tokens (default: the benchmark's, if any)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy (default: paper's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling p (default: paper's)")
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="enable_thinking of reasoning chat templates (default: on for math, off otherwise)")
    p.add_argument("--judge-model", default=None,
                   help="LongMemEval judge: a local/Hub chat model, or 'self' for the evaluated model")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampled decoding (default 0)")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (default auto: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_from_args)
    return p


def _run_from_args(args) -> int:
    metrics = evaluate(
        model=args.model, benchmark=args.benchmark, policy=args.policy, budget=args.budget, out=args.out,
        data_dir=args.data_dir, subset=args.subset, limit=args.limit, samples=args.samples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_input_tokens=args.max_input_tokens,
        buffer_size=args.buffer_size, sink=args.sink, window=args.window, prefill_chunk=args.prefill_chunk,
        temperature=args.temperature,
        top_p=args.top_p, thinking=None if args.thinking is None else args.thinking == "on",
        judge_model=args.judge_model, seed=args.seed, revision=args.revision, dtype=args.dtype, device=args.device,
        progress=not args.no_progress)
    ci = metrics["ci95"]
    print(f"{args.benchmark} {args.policy} budget={metrics['params']['budget']}: score {metrics['score']:.4f} "
          f"(95% CI {ci[0]:.4f}-{ci[1]:.4f}) over {metrics['n_problems']} problems, "
          f"{metrics['n_rows']} generations -> {args.out / 'metrics.json'}")
    return 0


# ---- the run ----

def evaluate(model: str, benchmark: str, policy: str, budget: int | None, out: Path, data_dir: Path | None = None,
             subset: str | None = None, limit: int | None = None, samples: int | None = None, batch_size: int = 1,
             max_new_tokens: int | None = None, max_input_tokens: int | None = None, buffer_size: int | None = None,
             sink: int | None = None, window: int = 0, prefill_chunk: int | None = None,
             temperature: float | None = None, top_p: float | None = None,
             thinking: bool | None = None, judge_model: str | None = None, seed: int = 0, revision: str | None = None,
             dtype: str = "auto", device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) one evaluation; returns the metrics written to `out/metrics.json`."""
    import torch

    bench = get_benchmark(benchmark)
    bench.configure(subset=subset, **({"judge_model": judge_model} if judge_model is not None else {}))
    settings = bench.settings
    samples = settings.samples if samples is None else samples
    temperature = settings.temperature if temperature is None else temperature
    top_p = settings.top_p if top_p is None else top_p
    thinking = bench.thinking if thinking is None else thinking
    max_input_tokens = bench.max_input_tokens if max_input_tokens is None else max_input_tokens
    for name, value in (("--samples", samples), ("--batch-size", batch_size), ("--limit", limit),
                        ("--max-new-tokens", max_new_tokens), ("--max-input-tokens", max_input_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if samples > 1 and temperature <= 0:
        raise ValueError(f"--samples {samples} needs sampling (--temperature > 0); greedy decoding repeats itself")
    data_dir = Path(data_dir) if data_dir is not None else Path("resources/data") / benchmark
    items = bench.load(data_dir, limit=limit)  # before the model: missing data fails fast
    if not items:
        raise ValueError(f"benchmark {benchmark!r} has no samples in {data_dir}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from trimkv.cli import _load_model  # one loading path for every command

    lm = _load_model(model, revision, dtype, device).eval()
    defaults = getattr(lm, "trimkv_defaults", {}) or {}
    budget = budget if budget is not None else defaults.get("memory_size")
    buffer_size = buffer_size if buffer_size is not None else defaults.get("buffer_size", 128)
    import trimkv

    # options left at None keep make_cache's (and the policy's) own defaults
    cache_args = {"policy": policy, "memory_size": budget, "buffer_size": buffer_size, "window": window,
                  **{k: v for k, v in (("sink", sink), ("prefill_chunk", prefill_chunk)) if v is not None}}
    probe = trimkv.make_cache(**cache_args)
    learned = probe.policy.learned
    if learned and not any(hasattr(module, learned) for module in lm.modules()):
        what = {"retention_gate": "retention gates", "retaining_head": "LocRet retaining heads",
                "attn_gate": "SeerAttention-R AttnGates"}.get(learned, learned)
        raise ValueError(f"policy {policy!r} needs {what}; {model} has none (use a checkpoint trained for it: "
                         f"python -m trimkv train --method {policy})")
    if not probe.policy.bounded:
        budget = cache_args["memory_size"] = None  # the full cache has no budget; keep params honest

    params = {"model": model, "revision": revision, "benchmark": benchmark, "subset": subset, "policy": policy,
              "budget": budget, "buffer_size": buffer_size, "sink": sink, "window": window,
              "prefill_chunk": prefill_chunk, "samples": samples,
              "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
              "max_input_tokens": max_input_tokens, "thinking": thinking, "seed": seed, "batch_size": batch_size,
              "dtype": dtype, "limit": limit, "judge_model": judge_model, "data_dir": str(data_dir),
              "data_revision": _data_revision(data_dir), "dataset": bench.dataset}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_params(out / "params.json", params)

    tokenizer = _tokenizer(lm, model)
    bench.bind(lm, tokenizer)
    done = _read_done(out / "samples.jsonl")
    runner = _Runner(lm, tokenizer, bench, cache_args, temperature, top_p, seed, thinking, max_new_tokens,
                     max_input_tokens, device)
    total = len(items) * samples
    bar = _progress(total, len(done), done, progress)
    with open(out / "samples.jsonl", "a", encoding="utf-8") as sink_file:
        def write(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                sink_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[(row["id"], row["sample"])] = row
            sink_file.flush()
            os.fsync(sink_file.fileno())
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(acc=f"{_mean([r['score'] for r in done.values()]):.3f}")

        if bench.multi_turn:
            runner.run_conversations(items, samples, done, write)
        else:
            runner.run_single(items, samples, done, write, batch_size)
    if bar is not None:
        bar.close()
    metrics = summarize(list(done.values()), bench, params, expected=total)
    _write_json(out / "metrics.json", metrics)
    return metrics


def _tokenizer(model, model_path: str):
    from transformers import AutoTokenizer

    source = getattr(model, "trimkv_source", {}) or {}
    tokenizer = AutoTokenizer.from_pretrained(source.get("base_model") or model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _data_revision(data_dir: Path) -> str | None:
    manifest = Path(data_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    return data.get("resolved_revision") or data.get("revision")


def _check_params(path: Path, params: dict[str, Any]) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in GENERATION_KEYS if old.get(k) != params.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in diff)
            raise ValueError(f"{path.parent} holds a run with other settings ({changes}); use a new --out")
    _write_json(path, params)


def _read_done(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished rows by (id, sample); a half-written last line (a killed run) is cut off the file."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good = 0  # bytes of complete, valid lines
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[(row["id"], row["sample"])] = row
        good += len(line)
    if good != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def _progress(total: int, initial: int, done, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="eval", unit="gen", dynamic_ncols=True)
    if done:
        bar.set_postfix(acc=f"{_mean([r['score'] for r in done.values()]):.3f}")
    return bar


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---- generation ----

class _Runner:
    def __init__(self, model, tokenizer, bench: Benchmark, cache_args, temperature, top_p, seed, thinking,
                 max_new_tokens, max_input_tokens, device):
        from trimkv.compat import generate_cache_kwarg

        self.model, self.tokenizer, self.bench = model, tokenizer, bench
        self.cache_args = cache_args
        self.sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                         else {"do_sample": False})
        self.seed, self.thinking, self.device = seed, thinking, device
        self.max_new_tokens, self.max_input_tokens = max_new_tokens, max_input_tokens
        self.cache_kwarg = generate_cache_kwarg(model)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = tokenizer.pad_token_id

    def new_cache(self):
        import trimkv

        return trimkv.make_cache(**self.cache_args)

    def limit(self, sample: Sample) -> int:
        return self.max_new_tokens or self.bench.max_new_tokens(sample)

    def _seed(self, key: tuple[str, int]) -> None:
        import torch

        torch.manual_seed(self.seed + zlib.crc32(f"{key[0]}\0{key[1]}".encode()))

    def _finish(self, tokens: list[int]) -> tuple[str, int]:
        """Decoded text and generated-token count (up to and including the first end-of-sequence)."""
        n = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        return self.tokenizer.decode(tokens[:n], skip_special_tokens=True), n

    def run_single(self, items, samples, done, write, batch_size) -> None:
        jobs = []
        for sample in items:
            ids = None
            for k in range(samples):
                if (sample.id, k) in done:
                    continue
                ids = ids or self.bench.encode(sample, self.tokenizer, self.thinking, self.max_input_tokens)
                jobs.append(Job(sample, k, ids, self.limit(sample)))
        jobs.sort(key=lambda j: (j.max_new_tokens, -len(j.ids), j.sample.id, j.index))
        batch: list[Job] = []
        for job in jobs:
            if batch and (len(batch) == batch_size or job.max_new_tokens != batch[0].max_new_tokens):
                write(self._run_batch(batch))
                batch = []
            batch.append(job)
        if batch:
            write(self._run_batch(batch))

    def _run_batch(self, batch: list[Job]) -> list[dict[str, Any]]:
        import torch

        width = max(len(j.ids) for j in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.ids):] = torch.tensor(job.ids)
            attention_mask[row, width - len(job.ids):] = 1
        cache = self.new_cache()
        self._seed(batch[0].key)
        generated = generate_batch(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                   batch[0].max_new_tokens, **{self.cache_kwarg: cache}, pad_token_id=self.pad,
                                   **self.sampling)
        per_sequence = cache.nbytes() // len(batch)
        finished = [self._finish(generated[row, width:].tolist()) for row in range(len(batch))]
        scores = self.bench.score_batch([j.sample for j in batch], [text for text, _ in finished])
        return [_row(job, text, n, per_sequence, score) for job, (text, n), score in zip(batch, finished, scores)]

    def run_conversations(self, items, samples, done, write) -> None:
        conversations: dict[str, list[Sample]] = defaultdict(list)
        for sample in items:
            conversations[sample.meta["conversation"]].append(sample)
        for turns in conversations.values():
            turns.sort(key=lambda s: s.meta["turn"])
            for k in range(samples):
                if all((s.id, k) in done for s in turns):
                    continue
                write(self._run_conversation(turns, k))

    def _run_conversation(self, turns: list[Sample], k: int) -> list[dict[str, Any]]:
        import torch

        cache, fed, rows = self.new_cache(), 0, []
        ids = self.bench.encode(turns[0], self.tokenizer, self.thinking, self.max_input_tokens)
        for i, sample in enumerate(turns):
            if i > 0:
                text = self.bench.follow_up(sample, turns[i - 1], self.tokenizer, self.thinking)
                ids = ids + self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) - 1 > fed:  # extend the kept state by this turn's prompt, all but its last token
                chunk = torch.tensor([ids[fed:-1]], device=self.device)
                mask = torch.ones((1, len(ids) - 1), dtype=torch.long, device=self.device)
                with torch.no_grad():
                    self.model(input_ids=chunk, attention_mask=mask, use_cache=True, logits_to_keep=1,
                               **{self.cache_kwarg: cache})
                fed = len(ids) - 1
            turn_cache = copy.deepcopy(cache)  # the answer is generated on a copy; the gold one is fed next
            self._seed((sample.id, k))
            job = Job(sample, k, ids, self.limit(sample))
            full = torch.tensor([ids], device=self.device)
            generated = generate_batch(self.model, full, torch.ones_like(full), job.max_new_tokens,
                                       **{self.cache_kwarg: turn_cache}, pad_token_id=self.pad, **self.sampling)
            text, n = self._finish(generated[0, len(ids):].tolist())
            rows.append(_row(job, text, n, turn_cache.nbytes(), self.bench.score(sample, text)))
            del turn_cache
        return rows


def generate_batch(model, input_ids, attention_mask, max_new_tokens: int, **kwargs):
    """Generate under no_grad; one function so tests can count or interrupt generation.

    On a GPU: `trimkv.decode.generate` (static shapes, CUDA-graph decode; the same tokens as stock generate,
    much faster). Elsewhere: stock `model.generate`.
    """
    import torch

    from trimkv.cache import BoundedCache
    from trimkv.compat import CACHE_KWARGS

    cache = next((kwargs[k] for k in CACHE_KWARGS if k in kwargs), None)
    if input_ids.is_cuda and isinstance(cache, BoundedCache):
        from trimkv import decode

        eos = kwargs.pop("eos_token_id", None)
        eos = model.generation_config.eos_token_id if eos is None else eos
        return decode.generate(model, input_ids, attention_mask, cache, max_new_tokens, eos_token_id=eos,
                               **{k: v for k, v in kwargs.items() if k not in CACHE_KWARGS})
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              **kwargs)


def _row(job: Job, text: str, n_tokens: int, cache_bytes: int, score: dict[str, Any]) -> dict[str, Any]:
    row = {"id": job.sample.id, "sample": job.index, "category": job.sample.category, "output": text,
           "extracted": score.get("extracted"), "score": float(score["score"]), "generated_tokens": n_tokens,
           "prompt_tokens": len(job.ids), "cache_bytes": int(cache_bytes)}
    row.update({k: v for k, v in score.items() if k not in row})
    return row


# ---- metrics ----

def summarize(rows: list[dict[str, Any]], bench: Benchmark, params: dict[str, Any], expected: int) -> dict[str, Any]:
    """metrics.json from the rows of samples.jsonl (their order does not matter)."""
    import numpy as np

    rows = sorted(rows, key=lambda r: (r["id"], r["sample"]))
    by_problem: dict[str, list[float]] = defaultdict(list)
    category: dict[str, str] = {}
    for row in rows:
        by_problem[row["id"]].append(row["score"])
        category[row["id"]] = row["category"] or "all"
    ids = sorted(by_problem)
    problem_scores = np.array([np.mean(by_problem[i]) for i in ids]) if ids else np.zeros(0)
    score = float(problem_scores.mean()) if ids else 0.0
    if len(ids) > 1:
        rng = np.random.default_rng(0)
        draws = rng.integers(0, len(ids), size=(BOOTSTRAP_RESAMPLES, len(ids)))
        means = problem_scores[draws].mean(axis=1)
        ci = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    else:
        ci = [score, score]
    per_category: dict[str, list[float]] = defaultdict(list)
    for i, value in zip(ids, problem_scores):
        per_category[category[i]].append(float(value))
    tokens = [r["generated_tokens"] for r in rows]
    memory = [r["cache_bytes"] for r in rows]
    return {
        "benchmark": bench.name, "score": score, "ci95": ci,
        "ci_method": f"percentile bootstrap over problems, {BOOTSTRAP_RESAMPLES} resamples, seed 0",
        "n_problems": len(ids), "n_rows": len(rows), "expected_rows": expected, "complete": len(rows) == expected,
        "samples_per_problem": params["samples"],
        "per_category": {c: {"score": float(np.mean(v)), "n": len(v)} for c, v in sorted(per_category.items())},
        "generated_tokens_mean": float(np.mean(tokens)) if tokens else 0.0,
        "cache_bytes_mean": float(np.mean(memory)) if memory else 0.0,
        "cache_bytes_max": int(max(memory)) if memory else 0,
        "benchmark_metrics": bench.aggregate(rows),
        "params": params,
    }
