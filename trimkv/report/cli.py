"""`python -m trimkv report tables|figures|retention`: the paper's tables and figures from the jobs' JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    from trimkv.report import collect, figures, retention, tables

    p = subparsers.add_parser("report", help="tables, figures and retention plots from the jobs' results",
                              description=__doc__ + "\n\nWhat each job writes (read by every subcommand):\n\n"
                              + collect.__doc__.split("\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="report_command", required=True, metavar="SUBCOMMAND")

    t = sub.add_parser("tables", help="tables (csv, md, tex) from results/eval, results/bench, results/gates",
                       description=tables.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--eval-dir", type=Path, required=True,
                   help="evaluation results: <model>/<benchmark>/<policy>/<budget>/metrics.json")
    t.add_argument("--bench-dir", type=Path, default=None, help="throughput results (any **/metrics.json)")
    t.add_argument("--gates-dir", type=Path, default=None, help="gate training runs: <run>/metrics.json")
    t.add_argument("--out", type=Path, required=True, help="output directory")
    t.add_argument("--no-ci", action="store_true", help="leave the 95%% CI out of the budget tables")
    t.add_argument("--ablation-policy", default="trimkv",
                   help="policy whose scores the loss-ablation table shows (default: trimkv)")
    t.set_defaults(func=_tables)

    f = sub.add_parser("figures", help="accuracy-vs-budget curves (png, pdf) and training curves",
                       description=figures.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--eval-dir", type=Path, required=True,
                   help="evaluation results: <model>/<benchmark>/<policy>/<budget>/metrics.json")
    f.add_argument("--gates-dir", type=Path, default=None, help="gate training runs, for training_curves")
    f.add_argument("--out", type=Path, required=True, help="output directory")
    f.set_defaults(func=_figures)

    r = sub.add_parser("retention", help="retention heatmaps, eviction decisions and retained tokens of a gated "
                       "model on one text", description=retention.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--model", required=True, help="gate checkpoint directory (or Hub id), ours or upstream format")
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the prompt text")
    source.add_argument("--input-file", type=Path, help="a file holding the prompt text")
    source.add_argument("--benchmark", help="take the prompt of a benchmark sample (with --data-dir, --sample)")
    r.add_argument("--data-dir", type=Path, default=None, help="the benchmark's data (default: resources/data/NAME)")
    r.add_argument("--sample", type=int, default=0, help="index of the benchmark sample (default: 0)")
    r.add_argument("--layers", default="0", help="layers to plot: 'all', '0,3' or '0-3' (default: 0)")
    r.add_argument("--heads", default="0", help="KV heads to plot: 'all', '0,1' or '0-3' (default: 0)")
    r.add_argument("--memory-size", type=int, default=None,
                   help="KV budget M for the eviction run (default: the checkpoint's training value)")
    r.add_argument("--buffer-size", type=int, default=None,
                   help="tokens added beyond M before compressing (default: the checkpoint's, else 0)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate greedily (default: 32)")
    r.add_argument("--prefill-chunk", type=int, default=None,
                   help="run the prompt in chunks of this many tokens, evicting after each (default: one pass)")
    r.add_argument("--max-input-tokens", type=int, default=1024,
                   help="keep only the first N prompt tokens (the heatmap is N x N; default: 1024)")
    r.add_argument("--tokenizer", default=None, help="tokenizer to use (default: the checkpoint's base model)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    r.add_argument("--out", type=Path, required=True, help="output directory")
    r.set_defaults(func=_retention)
    return p


def _report(paths: list[Path], out: Path) -> int:
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} files to {out}", file=sys.stderr)
    return 0


def _tables(args) -> int:
    from trimkv.report.tables import build_tables

    paths = build_tables(args.eval_dir, args.out, bench_dir=args.bench_dir, gates_dir=args.gates_dir,
                         ci=not args.no_ci, ablation_policy=args.ablation_policy)
    return _report(paths, args.out)


def _figures(args) -> int:
    from trimkv.report.figures import build_figures

    return _report(build_figures(args.eval_dir, args.out, gates_dir=args.gates_dir), args.out)


def _retention(args) -> int:
    from trimkv.report import retention

    for name in ("memory_size", "max_new_tokens", "prefill_chunk", "max_input_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.buffer_size is not None and args.buffer_size < 0:
        raise ValueError(f"--buffer-size must be >= 0, got {args.buffer_size}")
    if args.input_file is not None:
        if not args.input_file.is_file():
            raise ValueError(f"--input-file {args.input_file}: no such file")
        text = args.input_file.read_text(encoding="utf-8")
    elif args.benchmark is not None:
        from trimkv.eval import get_benchmark

        samples = get_benchmark(args.benchmark).load(args.data_dir or Path("resources/data") / args.benchmark,
                                                     limit=args.sample + 1)
        if len(samples) <= args.sample:
            raise ValueError(f"--sample {args.sample}: {args.benchmark} has only {len(samples)} samples")
        text = samples[args.sample].prompt
    else:
        text = args.text
    paths = retention.run(args.model, text, args.out, layers=args.layers, heads=args.heads,
                          memory_size=args.memory_size, buffer_size=args.buffer_size,
                          max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk,
                          max_input_tokens=args.max_input_tokens, tokenizer=args.tokenizer, device=args.device,
                          dtype=args.dtype)
    return _report(paths, args.out)
