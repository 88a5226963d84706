"""`report figures`: accuracy-vs-budget curves and training curves come out as non-empty png and pdf."""

from __future__ import annotations

import pytest
from test_report_fixtures import eval_job, paper_like

from trimkv.cli import main as trimkv_main


def main(argv):
    return trimkv_main(["report", *argv])
from trimkv.report.collect import load_eval
from trimkv.report.figures import budget_figure


def test_figures_from_results(tmp_path, capsys):
    results = paper_like(tmp_path / "results")
    out = results / "figures"
    assert main(["figures", "--eval-dir", str(results / "eval"), "--gates-dir", str(results / "gates"),
                 "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    expected = {f"{stem}.{ext}" for stem in ("budget_gsm8k_qwen3-tiny", "budget_gsm8k_llama-tiny",
                                             "budget_longbench_qwen3-tiny", "training_curves")
                for ext in ("png", "pdf")}
    assert expected <= names
    for name in expected:
        data = (out / name).read_bytes()
        assert len(data) > 5000
        assert data.startswith(b"\x89PNG" if name.endswith(".png") else b"%PDF")
    assert str(out / "training_curves.pdf") in capsys.readouterr().out


def test_budget_axis_and_full_line(tmp_path):
    for budget, score in ((64, 0.2), (256, 0.6)):
        eval_job(tmp_path, "m", "gsm8k", "trimkv", budget, score)
    eval_job(tmp_path, "m", "gsm8k", "full", None, 0.8)
    fig = budget_figure(load_eval(tmp_path / "eval"), "gsm8k", "m")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [64, 256]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["Full KV"].get_ydata()) == [80.0, 80.0]  # the horizontal full-cache line
    assert list(lines["trimkv"].get_ydata()) == pytest.approx([20.0, 60.0])


def test_only_full_cache_gives_no_budget_figure(tmp_path):
    eval_job(tmp_path, "m", "gsm8k", "full", None, 0.8)
    assert budget_figure(load_eval(tmp_path / "eval"), "gsm8k", "m") is None
