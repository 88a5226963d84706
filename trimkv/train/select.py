"""`python -m trimkv select`: of several training runs of one learned method (different seeds), keep the one
that scores best on the validation split.

What learned retention keeps at a tight budget can hinge on the run's seed: the offline preset's gates at
T/16 scored 68.9 / 74.0 / 85.2 / 74.5 / 76.2 on test over seeds 0-4, with one recipe. The workflow therefore
trains every seed listed in `models.<model>.<method>.seeds`, evaluates each run on the validation split of
`models.<model>.select` (a benchmark, its validation part, a budget), and this command copies the best run -
highest validation score, the first listed on a tie - to the method's directory, the one evaluation loads.
`selection.json` there records each run's seed and validation score and which was kept. The test split never
enters the choice, and every learned method (TRIM-KV's gates, LocRet, SeerAttention-R) is chosen the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def select(runs: list[Path], scores: list[Path], out: Path) -> dict:
    """Copy the best of `runs` (training output directories) to `out`, by the validation evaluations `scores`
    (their metrics.json, one per run, same order); returns the selection record. One run needs no score."""
    if not runs:
        raise ValueError("select: no runs given")
    if len(runs) > 1 and len(scores) != len(runs):
        raise ValueError(f"select: {len(runs)} runs need {len(runs)} validation scores, got {len(scores)}")
    values = [float(json.loads(Path(p).read_text())["score"]) for p in scores] if len(runs) > 1 else [None]
    best = max(range(len(runs)), key=lambda i: (values[i] or 0.0, -i))
    out.mkdir(parents=True, exist_ok=True)
    for item in runs[best].iterdir():
        if item.is_file():  # the trained module, its config, metrics, params and log; not checkpoints/
            shutil.copy2(item, out / item.name)
    seeds = [json.loads((run / "params.json").read_text()).get("seed") if (run / "params.json").is_file() else None
             for run in runs]
    record = {"kept": str(runs[best]), "seed": seeds[best], "validation_score": values[best],
              "runs": [{"run": str(run), "seed": seed, "validation_score": value, "scores": str(score)}
                       for run, seed, value, score in zip(runs, seeds, values, scores or [None])]}
    (out / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _main(args) -> int:
    record = select(args.runs, args.scores, args.out)
    scores = ", ".join(f"seed {r['seed']}: {r['validation_score']}" for r in record["runs"])
    print(f"kept {record['kept']} ({scores}) -> {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("select", help="keep the training run (seed) that scores best on validation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="training output directories")
    p.add_argument("--scores", type=Path, nargs="*", default=[],
                   help="each run's validation evaluation (its metrics.json), in the order of --runs; "
                   "not needed for a single run")
    p.add_argument("--out", type=Path, required=True, help="where the kept run's files are copied")
    p.set_defaults(func=_main)
