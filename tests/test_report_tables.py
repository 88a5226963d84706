"""`report tables`: numbers land in the right cells, holes are "–", and csv, md and tex say the same."""

from __future__ import annotations

import csv
import io
import re

import pytest
from test_report_fixtures import bench_job, eval_job, paper_like

from trimkv.cli import main as trimkv_main


def main(argv):
    return trimkv_main(["report", *argv])
from trimkv.report.tables import MISSING, build_tables


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    results = paper_like(tmp_path_factory.mktemp("tables") / "results")
    out = results / "tables"
    paths = build_tables(results / "eval", out, bench_dir=results / "bench", gates_dir=results / "gates")
    return out, paths


def read_csv(path):
    rows = list(csv.reader(io.StringIO(path.read_text())))
    return rows[0], rows[1:]


def read_md(path):
    """Header and rows of the pipe table, blanked group labels filled from the row above."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    header, rows, previous = split[0], [], None
    for row in split[2:]:
        if previous is not None:
            row = [p if c == "" else c for c, p in zip(row, previous)]
        rows.append(row)
        previous = row
    return header, rows


def md_value(cell: str) -> str:
    """'**50.0** (45.0–55.0)†' -> '50.0'."""
    return re.sub(r"[*†]", "", cell).split(" (")[0]


def test_writes_every_table_in_three_formats(tables):
    out, paths = tables
    stems = {p.stem for p in paths if p.suffix == ".md"}
    assert stems == {"budget_gsm8k", "budget_longbench", "categories_longbench", "throughput", "peak_memory", "gates",
                     "loss_ablation"}
    for stem in stems:
        for suffix in (".csv", ".md", ".tex"):
            assert (out / f"{stem}{suffix}").stat().st_size > 0
    assert (out / "eval_results.csv").is_file()


def test_budget_table_cells(tables):
    out, _ = tables
    header, rows = read_csv(out / "budget_gsm8k.csv")
    assert header[:2] == ["model", "policy"]
    assert [h for h in header[2:] if "CI" not in h] == ["64", "128", "256", "full"]  # budgets ascending, then full
    cell = {(r[0], r[1], h): v for r in rows for h, v in zip(header, r)}
    assert cell["qwen3-tiny", "trimkv", "128"] == "70.0"
    assert cell["qwen3-tiny", "trimkv", "128 CI low"] == "65.0"
    assert cell["qwen3-tiny", "trimkv", "128 CI high"] == "75.0"
    assert cell["llama-tiny", "snapkv", "256"] == "60.0"
    assert cell["llama-tiny", "full", "full"] == "80.0"
    assert cell["llama-tiny", "snapkv", "128"] == MISSING  # the hole
    assert cell["llama-tiny", "full", "64"] == MISSING
    assert [(r[0], r[1]) for r in rows][:3] == [("llama-tiny", "full"), ("llama-tiny", "snapkv"),
                                                 ("llama-tiny", "trimkv")]  # full first, the method last


def test_csv_md_and_tex_agree(tables):
    out, _ = tables
    for stem in ("budget_gsm8k", "categories_longbench", "throughput", "loss_ablation"):
        header, rows = read_csv(out / f"{stem}.csv")
        md_header, md_rows = read_md(out / f"{stem}.md")
        keep = [i for i, h in enumerate(header) if "CI" not in h]
        assert md_header == [header[i] for i in keep]
        assert len(md_rows) == len(rows)
        tex = (out / f"{stem}.tex").read_text()
        for row, md_row in zip(rows, md_rows):
            assert [md_value(c) for c in md_row] == [row[i] for i in keep], stem
            for value in row:
                if re.fullmatch(r"[0-9.]+", value):
                    assert value in tex, (stem, value)
    tex = (out / "budget_gsm8k.tex").read_text()
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{llrrrr}"):
        assert command in tex
    assert "--" in tex and MISSING not in tex  # the dash is spelled the LaTeX way


def test_bold_best_and_unfinished_mark(tables):
    out, _ = tables
    _, rows = read_md(out / "budget_gsm8k.md")
    cell = {(r[0], r[1]): r for r in rows}
    assert cell["qwen3-tiny", "trimkv"][2].startswith("**50.0**")  # best at budget 64
    assert not cell["qwen3-tiny", "snapkv"][2].startswith("**")
    assert cell["qwen3-tiny", "streaming"][3].endswith("†")  # unfinished run
    assert "\\textbf{70.0}" in (out / "budget_gsm8k.tex").read_text()


def test_category_table(tables):
    out, _ = tables
    header, rows = read_csv(out / "categories_longbench.csv")
    assert header == ["model", "budget", "policy", "multi_doc", "single_doc", "average"]
    by_policy = {r[2]: r[3:] for r in rows}
    assert by_policy["trimkv"] == ["35.0", "55.0", "45.0"]
    assert by_policy["h2o"] == [MISSING, "30.0", "30.0"]  # a category it has no score for
    assert by_policy["full"] == ["40.0", "60.0", "50.0"]
    assert not (out / "categories_gsm8k.csv").exists()  # one category: no table


def test_throughput_table(tables):
    out, _ = tables
    header, rows = read_csv(out / "throughput.csv")
    assert header == ["model", "policy", "budget", "ctx 16K, batch 8", "ctx 32K, batch 4"]
    assert rows == [["Qwen3-4B", "full", "full", "OOM", "68.4"], ["Qwen3-4B", "trimkv", "1024", "279.9", "130.5"]]
    header, rows = read_csv(out / "peak_memory.csv")
    assert rows[1][3:] == ["18.00", "14.00"]


def test_gates_and_loss_ablation_tables(tables):
    out, _ = tables
    header, rows = read_csv(out / "gates.csv")
    assert [r[0] for r in rows] == ["qwen3-tiny", "qwen3-tiny-paperloss"]
    assert rows[1][header.index("loss")] == "1.0000"
    header, rows = read_csv(out / "loss_ablation.csv")
    assert header[:3] == ["base model", "run", "capacity form"]  # only the loss setting that differs
    ablation = {r[1]: dict(zip(header, r)) for r in rows}
    assert ablation["qwen3-tiny"]["capacity form"] == "released"
    assert ablation["qwen3-tiny-paperloss"]["capacity form"] == "paper"
    assert ablation["qwen3-tiny-paperloss"]["gsm8k M=128"] == "65.0"  # eval of those gates, matched by path
    assert ablation["qwen3-tiny-paperloss"]["gsm8k M=64"] == MISSING
    assert ablation["qwen3-tiny"]["gsm8k M=128"] == "70.0"  # matched by the eval directory's model name


def test_no_ablation_when_loss_settings_agree(tmp_path):
    from test_report_fixtures import gate_run

    gate_run(tmp_path, "a", "base")
    gate_run(tmp_path, "b", "base")  # same loss settings: a rerun, not an ablation
    eval_job(tmp_path, "a", "gsm8k", "trimkv", 64, 0.5)
    paths = build_tables(tmp_path / "eval", tmp_path / "tables", gates_dir=tmp_path / "gates")
    assert "loss_ablation.csv" not in {p.name for p in paths} and "gates.csv" in {p.name for p in paths}


def test_cli_and_errors(tmp_path, capsys):
    eval_job(tmp_path, "m", "gsm8k", "trimkv", 64, 0.5)
    bench_job(tmp_path, "m", "trimkv", 64, 1024, 1, 10.0)
    (tmp_path / "bench" / "bad").mkdir()
    (tmp_path / "bench" / "bad" / "metrics.json").write_text('{"policy": "trimkv"}')  # lacks context, batch
    assert main(["tables", "--eval-dir", str(tmp_path / "eval"), "--bench-dir", str(tmp_path / "bench"),
                 "--out", str(tmp_path / "t"), "--no-ci"]) == 0
    captured = capsys.readouterr()
    assert "lacks context, batch" in captured.err
    _, rows = read_md(tmp_path / "t" / "budget_gsm8k.md")
    assert rows == [["m", "trimkv", "50.0"]]  # no CI
    assert main(["tables", "--eval-dir", str(tmp_path / "none"), "--out", str(tmp_path / "t")]) == 2
    assert "no job results" in capsys.readouterr().err
    eval_job(tmp_path / "other", "m", "gsm8k", "trimkv", 64, 0.5)
    (tmp_path / "eval" / "x").mkdir()
    (tmp_path / "eval" / "x" / "metrics.json").write_text("{broken")
    assert main(["tables", "--eval-dir", str(tmp_path / "eval"), "--out", str(tmp_path / "t")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["tables", "--help"])
    assert exit_.value.code == 0 and "budget_<benchmark>" in capsys.readouterr().out


def test_commands_plug_into_one_parser():
    import argparse

    from trimkv import tracking
    from trimkv.report import cli as report_cli

    parser = argparse.ArgumentParser(prog="python -m trimkv")
    sub = parser.add_subparsers(dest="command", required=True)
    report_cli.add_parser(sub)
    tracking.add_parser(sub)
    assert parser.parse_args(["report", "figures", "--eval-dir", "e", "--out", "o"]).func.__name__ == "_figures"
    assert parser.parse_args(["track", "--experiment", "x"]).func.__name__ == "_run_from_args"
    for argv in (["report", "--help"], ["report", "tables", "--help"], ["report", "retention", "--help"],
                 ["track", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 0


def test_bench_decode_output_fills_the_throughput_and_memory_tables(tmp_path):
    """What `bench decode --out` writes (its own row builder and writer), read back by the report: each row lands in
    its (model, policy, budget) x (context, batch) cell, with the device and the peak memory."""
    from trimkv.bench_decode import measurement, write_results
    from trimkv.report.collect import load_bench
    from trimkv.report.tables import bench_tables

    rows = [measurement("trimkv", 32768, 4, 1024, 1024, 128, 1152, prefill_ms=5354.9, decode_ms=5523.1,
                        bound_ms=2.93, dynamic_ms=59.7, compress_ms=5.71, compressions=8, peak_bytes=3 * 2**30),
            measurement("full", 32768, 4, 1024, None, 128, 33920, prefill_ms=5000.0, decode_ms=8970.0,
                        bound_ms=6.77, dynamic_ms=48.6, compress_ms=None, compressions=0, peak_bytes=5 * 2**30)]
    for row in rows:
        row.update(model="qwen3-4b", device="NVIDIA H100 80GB HBM3")
    write_results(tmp_path / "bench" / "qwen3-4b" / "metrics.json", rows, gpu="NVIDIA H100 80GB HBM3")
    bench = load_bench(tmp_path / "bench")
    assert [(b.model, b.policy, b.budget, b.context, b.batch) for b in bench] == [
        ("qwen3-4b", "trimkv", 1024, 32768, 4), ("qwen3-4b", "full", None, 32768, 4)]
    assert bench[0].tokens_per_s == pytest.approx(4 * 1024 / 5.5231)
    throughput, memory = bench_tables(bench)
    assert "NVIDIA H100 80GB HBM3" in throughput.caption and "1024 new tokens" in throughput.notes[0]
    cells = {labels[1]: cells[0] for labels, cells in throughput.rows}
    assert cells["trimkv"].value == pytest.approx(741.6, abs=0.1) and cells["full"].value == pytest.approx(456.6, abs=0.1)
    assert {labels[1]: cells[0].value for labels, cells in memory.rows} == {"full": 5.0, "trimkv": 3.0}
