"""Tables (csv, md, tex) and figures (png, pdf) computed from the jobs' metrics.json / params.json.

- collect.py    reads eval, gate-training and bench results into records (the expected keys are listed there)
- tables.py     the paper's tables: score by budget, per category, throughput, gate training, loss ablation
- figures.py    accuracy-vs-budget curves, training curves
- retention.py  retention heatmaps, eviction decisions and retained-token text of a gated model on one text
- cli.py        `python -m trimkv report tables|figures|retention`

matplotlib is imported only where a figure is drawn, so tables need nothing beyond the standard library.
"""
