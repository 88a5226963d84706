"""Figures from the jobs' JSON, each written as png and pdf.

  budget_<benchmark>_<model>.*  score x 100 against the KV budget M (log2 axis), one line per policy with its
                                95% CI as a band, the full cache as a dashed horizontal line: the paper's
                                accuracy-vs-budget (Pareto) plots. Hollow markers: unfinished runs.
  training_curves.*             with gate runs: loss, KL, NTP, capacity and mean beta per optimizer step
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from trimkv.report.collect import EvalResult, GateRun, load_eval, load_gates, policy_key
from trimkv.report.tables import slug

FORMATS = ("png", "pdf")
DPI = 150
# Fixed colours so a policy looks the same in every figure (tab10 order), the method in red.
COLOURS = {"trimkv": "#d62728", "full": "#000000", "streaming": "#1f77b4", "h2o": "#ff7f0e", "snapkv": "#2ca02c",
           "tova": "#9467bd", "keydiff": "#8c564b", "knorm": "#e377c2", "random": "#7f7f7f", "rkv": "#bcbd22",
           "seerattn": "#17becf", "locret": "#393b79"}
MARKERS = "osD^v<>ph"
TRAIN_CURVES = (("loss", "total loss"), ("kl", "KL(teacher || student)"), ("ntp", "next-token CE"),
                ("capacity", "capacity loss"), ("beta_mean", "mean beta"))


def new_figure(width: float, height: float, layout: str = "constrained"):
    """A figure that needs no display and no pyplot state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}  # reproducible files
        fig.savefig(path, dpi=DPI, metadata=metadata)
        paths.append(path)
    return paths


def style(policy: str, i: int) -> dict:
    base = policy.split("-")[0].split("_")[0]
    colour = COLOURS.get(policy) or COLOURS.get(base) or f"C{i % 10}"
    main = base == "trimkv"
    return {"color": colour, "marker": "*" if main else MARKERS[i % len(MARKERS)], "markersize": 9 if main else 5,
            "linewidth": 2.2 if main else 1.4, "zorder": 3 if main else 2}


def budget_figure(results: list[EvalResult], benchmark: str, model: str):
    """Score against budget for one benchmark and model; None when nothing was run with a bounded cache."""
    from matplotlib.ticker import FixedLocator, NullLocator

    bounded = defaultdict(list)
    full = []
    for r in results:
        (full if r.budget is None else bounded[r.policy]).append(r)
    if not bounded:
        return None
    fig = new_figure(5.2, 3.6)
    ax = fig.add_subplot()
    budgets = sorted({r.budget for rs in bounded.values() for r in rs})
    for i, r in enumerate(sorted(full, key=lambda r: policy_key(r.policy))):
        label = "Full KV" if r.policy == "full" else f"{r.policy} (full cache)"
        colour = "black" if i == 0 else f"C{(i + 5) % 10}"
        ax.axhline(100 * r.score, color=colour, linestyle="--", linewidth=1.2, label=label, zorder=1)
        if r.ci95:
            ax.axhspan(100 * r.ci95[0], 100 * r.ci95[1], color=colour, alpha=0.07, linewidth=0)
    for i, policy in enumerate(sorted(bounded, key=policy_key)):
        points = sorted(bounded[policy], key=lambda r: r.budget)
        xs = [r.budget for r in points]
        ys = [100 * r.score for r in points]
        kw = style(policy, i)
        ax.plot(xs, ys, label=policy, **kw)
        unfinished = [(x, y) for r, x, y in zip(points, xs, ys) if not r.complete]
        if unfinished:  # hollow markers over the filled ones
            ax.plot(*zip(*unfinished), linestyle="none", marker=kw["marker"], markersize=kw["markersize"],
                    color=kw["color"], markerfacecolor="white", zorder=kw["zorder"] + 1)
        if all(r.ci95 for r in points):
            ax.fill_between(xs, [100 * r.ci95[0] for r in points], [100 * r.ci95[1] for r in points],
                            color=kw["color"], alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(budgets))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in budgets])
    if len(budgets) == 1:
        ax.set_xlim(budgets[0] / 2, budgets[0] * 2)
    ax.set_xlabel("KV budget M (tokens per layer and KV head)")
    ax.set_ylabel("score (x 100)")
    ax.set_title(f"{benchmark} · {model}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best", frameon=False)
    return fig


def budget_figures(evals: list[EvalResult], out: Path) -> list[Path]:
    groups = defaultdict(list)
    for r in evals:
        groups[(r.benchmark, r.model)].append(r)
    paths = []
    for (benchmark, model), results in sorted(groups.items()):
        fig = budget_figure(results, benchmark, model)
        if fig is not None:
            paths += save(fig, out, f"budget_{slug(benchmark)}_{slug(model)}")
    return paths


def training_figure(runs: list[GateRun]):
    from matplotlib.ticker import MaxNLocator

    curves = [(key, title) for key, title in TRAIN_CURVES if any(r.curves.get(key) for r in runs)]
    if not curves:
        return None
    fig = new_figure(3.2 * len(curves), 2.8)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (key, title) in zip(axes, curves):
        for i, run in enumerate(sorted(runs, key=lambda r: r.label)):
            values = run.curves.get(key) or []
            steps = run.curves.get("step") or list(range(1, len(values) + 1))
            if values:
                ax.plot(steps[: len(values)], values, label=run.label, color=f"C{i % 10}", linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    return fig


def build_figures(eval_dir: Path, out: Path, gates_dir: Path | None = None) -> list[Path]:
    """Every figure the results allow; returns the files written."""
    evals, runs = load_eval(eval_dir), load_gates(gates_dir)
    if not (evals or runs):
        searched = ", ".join(str(d) for d in (eval_dir, gates_dir) if d is not None)
        raise ValueError(f"no job results (metrics.json) found under {searched}")
    out = Path(out)
    paths = budget_figures(evals, out)
    fig = training_figure(runs)
    if fig is not None:
        paths += save(fig, out, "training_curves")
    return paths
