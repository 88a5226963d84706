"""The paper's tables, computed from the jobs' JSON (collect.py), each written as csv, md and tex (booktabs).

Written by `build_tables` into the output directory:

  budget_<benchmark>.*      score x 100 per (model, policy) row and KV budget column (plus "full" for the
                            full cache), 95% bootstrap CI; the best bounded policy per model and budget in bold
                            (a policy that keeps the full cache in memory, seerattn_r, is noted and not ranked)
  categories_<benchmark>.*  benchmarks whose results have two or more categories (LongBench tasks, SCBench
                            subsets, LongMemEval question types, ...): per-category scores x 100 per
                            (model, policy, budget) row, and the overall score ("average")
  throughput.*              with bench results: generated tokens/s per (model, policy, budget) row and
                            (context, batch) column; "OOM" where the run ran out of memory
  peak_memory.*             with bench results that record peak_memory_bytes: GiB, same layout
  gates.*                   with gate runs: final training losses of each run
  loss_ablation.*           when two or more gate runs of one base model differ in their loss settings
                            (collect.LOSS_KEYS): those settings, the final losses, and the evaluation scores
                            of the runs' gates with the trimkv policy
  eval_results.csv          every evaluation job, one row each, unrounded (score and CI as fractions)

A cell with no job is "–" in all three formats; md and tex mark an unfinished evaluation with "†". The csv
holds the same rows and columns as the md and tex, with the CI in two extra columns per value column.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trimkv.report.collect import (
    FULL,
    FULL_MEMORY_POLICIES,
    LOSS_KEYS,
    BenchResult,
    EvalResult,
    GateRun,
    budget_key,
    budget_label,
    load_bench,
    load_eval,
    load_gates,
    model_label,
    policy_key,
)

MISSING = "–"
INCOMPLETE = "†"
NOTE_MARKS = f"{MISSING} not run; {INCOMPLETE} unfinished run (fewer generations than planned)."
NOTE_SCORE = f"Scores x 100; 95% bootstrap CI over problems in parentheses. {NOTE_MARKS}"
NOTE_SCORE_NO_CI = f"Scores x 100. {NOTE_MARKS}"


@dataclass
class Cell:
    value: float | None = None
    low: float | None = None  # CI bounds, in the value's units
    high: float | None = None
    text: str | None = None  # a non-numeric cell ("OOM", a label)
    bold: bool = False
    mark: str = ""  # appended in md and tex
    digits: int | None = None  # None: the table's

    @property
    def empty(self) -> bool:
        return self.value is None and self.text is None


@dataclass
class Table:
    name: str  # file stem
    caption: str
    index: list[str]  # header of the label columns
    columns: list[str]  # header of the value columns
    rows: list[tuple[list[str], list[Cell]]] = field(default_factory=list)
    digits: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def has_ci(self) -> bool:
        return any(c.low is not None for _, cells in self.rows for c in cells)

    def number(self, cell: Cell, value: float | None = None) -> str:
        value = cell.value if value is None else value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        return f"{value:.{self.digits if cell.digits is None else cell.digits}f}"

    def plain(self, cell: Cell) -> str:
        return cell.text if cell.text is not None else self.number(cell)


# ---- writers ----

def to_csv(table: Table) -> str:
    header = list(table.index)
    for column in table.columns:
        header += [column] + ([f"{column} CI low", f"{column} CI high"] if table.has_ci else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for labels, cells in table.rows:
        row = list(labels)
        for cell in cells:
            row.append(table.plain(cell))
            if table.has_ci:
                row += [table.number(cell, cell.low) if cell.low is not None else MISSING,
                        table.number(cell, cell.high) if cell.high is not None else MISSING]
        writer.writerow(row)
    return buffer.getvalue()


def _blanked(rows: list[tuple[list[str], list[Cell]]]):
    """Row labels with a leading run equal to the previous row's left blank (grouped look in md and tex)."""
    previous: list[str] = []
    for labels, cells in rows:
        shown, same = [], True
        for i, label in enumerate(labels):
            same = same and i < len(previous) and previous[i] == label and i < len(labels) - 1
            shown.append("" if same else label)
        previous = labels
        yield labels, shown, cells


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    def cell_text(cell: Cell) -> str:
        if cell.empty:
            return MISSING
        text = table.plain(cell)
        text = f"**{text}**" if cell.bold else text
        if cell.low is not None and cell.high is not None:
            text += f" ({table.number(cell, cell.low)}–{table.number(cell, cell.high)})"
        return _md_escape(text + cell.mark)

    lines = [f"**{_md_escape(table.caption)}**", ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in table.index + table.columns) + " |")
    lines.append("| " + " | ".join([":---"] * len(table.index) + ["---:"] * len(table.columns)) + " |")
    for _, shown, cells in _blanked(table.rows):
        lines.append("| " + " | ".join([_md_escape(s) for s in shown] + [cell_text(c) for c in cells]) + " |")
    if table.notes:
        lines += [""] + [f"_{_md_escape(note)}_" for note in table.notes]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
                "†": r"$^\dagger$", "×": r"$\times$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    def cell_text(cell: Cell) -> str:
        if cell.empty:
            return "--"
        text = tex_escape(table.plain(cell))
        text = rf"\textbf{{{text}}}" if cell.bold else text
        if cell.low is not None and cell.high is not None:
            text += rf"\,{{\scriptsize({table.number(cell, cell.low)}--{table.number(cell, cell.high)})}}"
        return text + tex_escape(cell.mark)

    spec = "l" * len(table.index) + "r" * len(table.columns)
    lines = ["% generated by `python -m trimkv report tables` from the jobs' metrics.json; do not edit",
             r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(table.caption)}}}", rf"\label{{tab:{table.name}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in table.index + table.columns) + r" \\", r"\midrule"]
    first = None
    for labels, shown, cells in _blanked(table.rows):
        if first is not None and labels[:1] != first and len(table.index) > 1:
            lines.append(r"\midrule")
        first = labels[:1]
        lines.append(" & ".join([tex_escape(s) for s in shown] + [cell_text(c) for c in cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\smallskip{\footnotesize " + " ".join(tex_escape(n) for n in table.notes) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, render in ((".csv", to_csv), (".md", to_markdown), (".tex", to_latex)):
        path = out / f"{table.name}{suffix}"
        path.write_text(render(table), encoding="utf-8")
        paths.append(path)
    return paths


# ---- builders ----

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "_"


def _bold_best(cells: list[Cell], table: Table, lower_is_better: bool = False) -> None:
    """Bold the best displayed value among `cells` (ties all bold) when at least two have values."""
    shown = [(float(table.number(c)), c) for c in cells if c.value is not None]
    if len(shown) < 2:
        return
    best = (min if lower_is_better else max)(v for v, _ in shown)
    for v, c in shown:
        c.bold = v == best


def score_tables(evals: list[EvalResult], ci: bool = True) -> list[Table]:
    """One table per benchmark: rows (model, policy), columns the budgets (then "full")."""
    tables = []
    by_bench: dict[str, list[EvalResult]] = defaultdict(list)
    for r in evals:
        by_bench[r.benchmark].append(r)
    for bench, results in sorted(by_bench.items()):
        budgets = sorted({r.budget for r in results}, key=budget_key)
        cells = {(r.model, r.policy, r.budget): r for r in results}
        table = Table(name=f"budget_{slug(bench)}", caption=f"{bench}: score by KV budget (tokens per layer and "
                      "KV head)", index=["model", "policy"], columns=[budget_label(b) for b in budgets],
                      notes=[NOTE_SCORE if ci else NOTE_SCORE_NO_CI])
        rows = sorted({(r.model, r.policy) for r in results}, key=lambda mp: (mp[0], policy_key(mp[1])))
        for model, policy in rows:
            row = []
            for budget in budgets:
                r = cells.get((model, policy, budget))
                row.append(_score_cell(r, ci) if r is not None else Cell())
            table.rows.append(([model, policy], row))
        for model in sorted({m for m, _ in rows}):
            for j, budget in enumerate(budgets):
                if budget is not None:
                    _bold_best([c[j] for (m, p), c in table.rows if m == model and p not in FULL_MEMORY_POLICIES],
                               table)
        full_memory = sorted({p for _, p in rows if p in FULL_MEMORY_POLICIES})
        if full_memory:
            table.notes.append(f"{', '.join(full_memory)}: the budget bounds the tokens each decoding step reads; "
                               "the full cache stays in memory (its cache bytes are the full cache's), so it is "
                               "not ranked against the memory-bounded policies.")
        tables.append(table)
    return tables


def _score_cell(r: EvalResult, ci: bool) -> Cell:
    low, high = (r.ci95 if ci and r.ci95 is not None else (None, None))
    return Cell(value=100 * r.score, low=None if low is None else 100 * low, high=None if high is None else 100 * high,
                mark="" if r.complete else INCOMPLETE)


def category_tables(evals: list[EvalResult]) -> list[Table]:
    """Per-category scores for each benchmark whose results have two or more categories."""
    tables = []
    by_bench: dict[str, list[EvalResult]] = defaultdict(list)
    for r in evals:
        by_bench[r.benchmark].append(r)
    for bench, results in sorted(by_bench.items()):
        categories = sorted({c for r in results for c in r.per_category})
        if len(categories) < 2:
            continue
        table = Table(name=f"categories_{slug(bench)}", caption=f"{bench}: score per category",
                      index=["model", "budget", "policy"], columns=[*categories, "average"],
                      notes=[(f"Scores x 100. {MISSING} not run or no problem of that category; "
                              f"{INCOMPLETE} unfinished run.")])
        for r in sorted(results, key=lambda r: (r.model, budget_key(r.budget), policy_key(r.policy))):
            mark = "" if r.complete else INCOMPLETE
            row = [Cell(value=100 * r.per_category[c]) if c in r.per_category else Cell() for c in categories]
            row.append(Cell(value=100 * r.score, mark=mark))
            table.rows.append(([r.model, budget_label(r.budget), r.policy], row))
        groups = defaultdict(list)
        for labels, row in table.rows:
            groups[(labels[0], labels[1])].append(row)
        for (_, budget), rows in groups.items():
            if budget != FULL:
                for j in range(len(table.columns)):
                    _bold_best([row[j] for row in rows], table)
        tables.append(table)
    return tables


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def bench_tables(bench: list[BenchResult]) -> list[Table]:
    """Throughput (and peak memory, when recorded) per (model, policy, budget) and (context, batch)."""
    if not bench:
        return []
    seen: dict[tuple, BenchResult] = {}
    for b in bench:
        key = (b.model, b.policy, b.budget, b.context, b.batch)
        if key in seen:
            raise ValueError(f"two bench results for one cell {key}: {seen[key].path} and {b.path}")
        seen[key] = b
    settings = sorted({(b.context, b.batch) for b in bench})
    columns = [f"ctx {_context_label(c)}, batch {n}" for c, n in settings]
    rows = sorted({(b.model, b.policy, b.budget) for b in bench},
                  key=lambda k: (k[0], policy_key(k[1]), budget_key(k[2])))
    devices = sorted({str(b.values["device"]) for b in bench if b.values.get("device")})
    on = f" on {', '.join(devices)}" if devices else ""
    new_tokens = sorted({int(b.values["new_tokens"]) for b in bench if b.values.get("new_tokens")})
    gen = f", {', '.join(map(str, new_tokens))} new tokens per sequence" if new_tokens else ""
    throughput = Table(name="throughput", caption=f"Decode throughput (generated tokens/s, whole batch){on}",
                       index=["model", "policy", "budget"], columns=columns,
                       notes=[f"Generated tokens per second over the whole batch{gen}. {MISSING} not run."])
    memory = Table(name="peak_memory", caption=f"Peak memory (GiB){on}", index=["model", "policy", "budget"],
                   columns=columns, digits=2, notes=[f"Peak accelerator memory in GiB. {MISSING} not recorded."])
    for model, policy, budget in rows:
        speed, peak = [], []
        for context, batch in settings:
            b = seen.get((model, policy, budget, context, batch))
            if b is None:
                speed.append(Cell())
                peak.append(Cell())
                continue
            speed.append(Cell(text="OOM") if b.oom else Cell(value=b.tokens_per_s))
            bytes_ = b.values.get("peak_memory_bytes")
            peak.append(Cell(text="OOM") if b.oom else Cell(value=None if bytes_ is None else bytes_ / 2**30))
        labels = [model, policy, budget_label(budget)]
        throughput.rows.append((labels, speed))
        memory.rows.append((labels, peak))
    for model in sorted({m for m, _, _ in rows}):
        for j in range(len(columns)):
            _bold_best([c[j] for labels, c in throughput.rows if labels[0] == model], throughput)
    has_memory = any(c.value is not None for _, cells in memory.rows for c in cells)
    return [throughput, memory] if has_memory else [throughput]


TRAIN_COLUMNS = (("steps", "steps", 0), ("train_tokens", "train tokens", 0), ("loss", "loss", 4), ("kl", "KL", 4),
                 ("ntp", "NTP", 4), ("capacity", "capacity", 4), ("beta_mean", "mean beta", 4))


def gates_table(runs: list[GateRun]) -> list[Table]:
    """Final training values of every gate run."""
    if not runs:
        return []
    table = Table(name="gates", caption="Gate training: final values", index=["run", "base model", "M"],
                  columns=[header for _, header, _ in TRAIN_COLUMNS],
                  notes=[f"Losses of the last optimizer step. {MISSING} not recorded."])
    for run in sorted(runs, key=lambda r: (r.base_model, r.label)):
        cells = [Cell(value=_number(run.final.get(key)), digits=digits) for key, _, digits in TRAIN_COLUMNS]
        if not run.final.get("complete", True):
            cells[0].mark = INCOMPLETE
        table.rows.append(([run.label, model_label(run.base_model), str(run.params.get("memory_size", MISSING))],
                           cells))
    return [table]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ablation_table(runs: list[GateRun], evals: list[EvalResult], policy: str = "trimkv") -> list[Table]:
    """Gate runs of one base model that differ in loss settings, side by side with their evaluation scores."""
    groups: dict[str, list[GateRun]] = defaultdict(list)
    for run in runs:
        groups[run.base_model].append(run)
    varying: set[str] = set()
    chosen: list[GateRun] = []
    for group in groups.values():
        differ = {k for k in LOSS_KEYS if len({repr(r.params.get(k)) for r in group}) > 1}
        if len(group) >= 2 and differ:
            varying |= differ
            chosen += sorted(group, key=lambda r: r.label)
    if not chosen:
        return []
    keys = [k for k in LOSS_KEYS if k in varying]

    def of_run(r: EvalResult, run: GateRun) -> bool:
        if r.policy != policy:
            return False
        model = str(r.params.get("model", ""))
        same_path = bool(model) and Path(model).resolve() == run.path.resolve()
        return same_path or r.model == model_label(run.label)

    matched = {run.label: [r for r in evals if of_run(r, run)] for run in chosen}
    score_columns = sorted({(r.benchmark, r.budget) for rs in matched.values() for r in rs},
                           key=lambda bb: (bb[0], budget_key(bb[1])))
    losses = [(k, h, d) for k, h, d in TRAIN_COLUMNS if k in ("loss", "kl", "ntp", "capacity")]
    table = Table(name="loss_ablation", caption="Loss ablation: gate runs of one base model with different losses",
                  index=["base model", "run", *(LOSS_KEYS[k] for k in keys)],
                  columns=[h for _, h, _ in losses] + [f"{b} M={budget_label(m)}" for b, m in score_columns],
                  notes=[(f"Final training losses; evaluation scores x 100 of each run's gates with the {policy} "
                          f"policy at budget M. {MISSING} not run; {INCOMPLETE} unfinished run.")])
    for run in chosen:
        cells = [Cell(value=_number(run.final.get(k)), digits=d) for k, _, d in losses]
        by_cell = {(r.benchmark, r.budget): r for r in matched[run.label]}
        for bb in score_columns:
            r = by_cell.get(bb)
            cells.append(Cell(value=100 * r.score, mark="" if r.complete else INCOMPLETE) if r else Cell())
        labels = [model_label(run.base_model), run.label, *(str(run.params.get(k, MISSING)) for k in keys)]
        table.rows.append((labels, cells))
    for base in {labels[0] for labels, _ in table.rows}:
        rows = [c for labels, c in table.rows if labels[0] == base]
        for j in range(len(losses), len(table.columns)):
            _bold_best([c[j] for c in rows], table)
    return [table]


LONG_COLUMNS = ("model", "benchmark", "policy", "budget", "score", "ci_low", "ci_high", "n_problems", "n_rows",
                "complete", "generated_tokens_mean", "cache_bytes_mean", "path")


def eval_results_csv(evals: list[EvalResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LONG_COLUMNS)
    for r in sorted(evals, key=lambda r: (r.benchmark, r.model, policy_key(r.policy), budget_key(r.budget))):
        low, high = r.ci95 if r.ci95 else ("", "")
        writer.writerow([r.model, r.benchmark, r.policy, "" if r.budget is None else r.budget, repr(r.score),
                         low, high, r.metrics.get("n_problems", ""), r.metrics.get("n_rows", ""), r.complete,
                         r.metrics.get("generated_tokens_mean", ""), r.metrics.get("cache_bytes_mean", ""),
                         r.path.as_posix()])
    return buffer.getvalue()


def build_tables(eval_dir: Path, out: Path, bench_dir: Path | None = None, gates_dir: Path | None = None,
                 ci: bool = True, ablation_policy: str = "trimkv") -> list[Path]:
    """Every table the results allow; returns the files written."""
    evals, bench, runs = load_eval(eval_dir), load_bench(bench_dir), load_gates(gates_dir)
    if not (evals or bench or runs):
        searched = ", ".join(str(d) for d in (eval_dir, bench_dir, gates_dir) if d is not None)
        raise ValueError(f"no job results (metrics.json) found under {searched}")
    tables = [*score_tables(evals, ci), *category_tables(evals), *bench_tables(bench), *gates_table(runs),
              *ablation_table(runs, evals, ablation_policy)]
    out = Path(out)
    paths = [p for table in tables for p in write_table(table, out)]
    if evals:
        (out / "eval_results.csv").write_text(eval_results_csv(evals), encoding="utf-8")
        paths.append(out / "eval_results.csv")
    return paths
