"""`python -m trimkv bench kernels`: a decode step's big kernels alone, at a model's shapes (default Qwen3-4B).

- The products of a step at 4-8 rows: per layer q, k, v and the gate's first layer as one product, o_proj, the
  MLP's gate and up as one, down_proj; then the LM head. `trimkv.kernels.decode_linear` (the partial sums; the
  captured step fuses their sum into the next operation) against cuBLAS (`F.linear`).
- One layer's attention of one token per row over the cache's slots (M + buffer): `trimkv.kernels.
  decode_attention` (split and merge) against SDPA (its default dispatch, GQA).

Each is timed as a CUDA graph of every layer's calls, every layer with its own weights or keys and values (as
in a step: nothing is served from L2), and printed with the fraction of the device-to-device copy bandwidth,
measured in the same run, at which it reads its bytes. `--sweep` also times variants of the kernels' launch
constants (block widths, thread blocks per SM, splits): the search behind the defaults, to rerun on another GPU.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

LINEAR_VARIANTS = [dict(BLOCK_N=n, PROGRAMS=p, MIN_SLICE=s) for n, p, s in
                   ((64, 4, 512), (32, 4, 512), (128, 4, 512), (64, 8, 512), (64, 2, 512), (64, 8, 256),
                    (32, 8, 256))]
ATTENTION_VARIANTS = [dict(TARGET_PROGRAMS=t, BLOCK_N=n, NUM_STAGES=s)
                      for t in (256, 512, 1024, 2048) for n in (32, 64) for s in (2, 3)]


def product_shapes(architecture: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of a decode step's products per layer, the layers sharing an input as one, and the LM head."""
    from trimkv.bench_decode import ARCHITECTURES
    from trimkv.gates import GateConfig

    a = ARCHITECTURES[architecture]
    d, inter, hd = a["hidden_size"], a["intermediate_size"], a["head_dim"]
    q, kv = a["num_attention_heads"] * hd, a["num_key_value_heads"] * hd
    return [("qkv+gate", q + 2 * kv + GateConfig().intermediate_size, d), ("o_proj", d, q),
            ("gate+up", 2 * inter, d), ("down_proj", d, inter), ("lm_head", a["vocab_size"], d)]


@contextmanager
def constants(module, **values):
    """Set a kernel module's launch constants for the block, and put them back after."""
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per run of fn, captured once as a CUDA graph (after two warm-up runs on a side stream, which
    also autotune) and replayed reps times."""
    import torch

    from trimkv.decode import on_side_stream

    on_side_stream(lambda: (fn(), fn()))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _each(product, x, weights) -> list:
    return [product(x, w) for w in weights]


def time_products(product, shapes, weights, head, inputs, rows: int, bandwidth: float) -> dict:
    """Per shape: us per product (over every layer's) and fraction of the copy bandwidth; then the whole step's
    products in one graph."""
    per = {}
    for i, (name, n, k) in enumerate(shapes[:-1]):
        ms = graph_ms(partial(_each, product, inputs[rows, k], [w[i] for w in weights])) / len(weights)
        per[name] = dict(us=ms * 1e3, of_bandwidth=n * k * 2 / bandwidth / (ms / 1e3))
    x = inputs[rows, head.shape[1]]
    ms = graph_ms(partial(product, x, head))
    per["lm_head"] = dict(us=ms * 1e3, of_bandwidth=head.numel() * 2 / bandwidth / (ms / 1e3))
    step = [(inputs[rows, w.shape[1]], w) for ws in weights for w in ws] + [(x, head)]
    ms = graph_ms(lambda: [product(a, w) for a, w in step])
    nbytes = sum(w.numel() * w.element_size() for _, w in step)
    return dict(step_ms=ms, of_bandwidth=nbytes / bandwidth / (ms / 1e3), per_shape=per)


def time_attention(batch: int, architecture: str, slots: int, bandwidth: float, sweep: bool) -> list[dict]:
    """One layer's attention (us, averaged over every layer's in one graph) by SDPA, by decode_attention, and
    with --sweep by decode_attention under each variant of its launch constants."""
    import torch
    import torch.nn.functional as F

    from trimkv.bench_decode import ARCHITECTURES
    from trimkv.kernels import decode_attention as attention_module

    a = ARCHITECTURES[architecture]
    layers, hq, hkv, hd = a["num_hidden_layers"], a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    keys = [torch.randn(batch, hkv, slots, hd, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    values = [torch.randn_like(k) for k in keys]
    query = torch.randn(batch, hq, 1, hd, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, 1, 1, slots, dtype=torch.bool, device="cuda")
    nbytes = 2 * keys[0].numel() * keys[0].element_size()

    def sdpa(k, v):
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True)

    def ours(k, v):
        return attention_module.decode_attention(query, k, v, mask, hd**-0.5)

    def row(name, attend, **variant):
        ms = graph_ms(lambda: [attend(k, v) for k, v in zip(keys, values)]) / layers
        return dict(kind="attention", batch=batch, slots=slots, kernel=name, **variant, us_per_layer=ms * 1e3,
                    of_bandwidth=nbytes / bandwidth / (ms / 1e3))

    rows = [row("sdpa", sdpa), row("decode_attention", ours)]
    for variant in ATTENTION_VARIANTS if sweep else []:
        with constants(attention_module, **variant):
            rows.append(row("decode_attention", ours, **variant))
    return rows


def kernels(args) -> int:
    import torch
    import torch.nn.functional as F

    from trimkv.bench_decode import ARCHITECTURES, copy_bandwidth
    from trimkv.kernels import decode_linear as linear_module

    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA GPU")
    layers = ARCHITECTURES[args.architecture]["num_hidden_layers"]
    bandwidth = copy_bandwidth()
    about = dict(gpu=torch.cuda.get_device_name(), copy_bandwidth_TBps=bandwidth / 1e12, model=args.architecture)
    print(json.dumps(about), flush=True)
    results = []

    def emit(row):
        results.append(row)
        print(json.dumps(row), flush=True)

    for batch in args.rows:
        for row in time_attention(batch, args.architecture, args.slots, bandwidth, args.sweep):
            emit(row)
        torch.cuda.empty_cache()

    shapes = product_shapes(args.architecture)
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _, n, k in shapes[:-1]]
               for _ in range(layers)]
    head = torch.randn(shapes[-1][1], shapes[-1][2], device="cuda", dtype=torch.bfloat16)
    inputs = {(m, k): torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in args.rows for _, _, k in shapes}
    for rows in args.rows:
        emit(dict(kind="products", rows=rows, kernel="cublas",
                  **time_products(F.linear, shapes, weights, head, inputs, rows, bandwidth)))
        emit(dict(kind="products", rows=rows, kernel="decode_linear", **time_products(
            linear_module.decode_linear_partials, shapes, weights, head, inputs, rows, bandwidth)))
    for variant in LINEAR_VARIANTS if args.sweep else []:
        with constants(linear_module, **variant):
            linear_module._decode_linear_kernel.cache.clear()  # BLOCK_N is not in the autotuner's key
            for rows in args.rows:
                emit(dict(kind="products", rows=rows, kernel="decode_linear", **variant, **time_products(
                    linear_module.decode_linear_partials, shapes, weights, head, inputs, rows, bandwidth)))
    linear_module._decode_linear_kernel.cache.clear()

    print(f"\n{'kernels':<58} {'rows':>4} {'ms / step':>9} {'of bandwidth':>12} {'vs baseline':>11}")
    base = {}
    for r in results:
        step_ms = r["us_per_layer"] * layers / 1e3 if r["kind"] == "attention" else r["step_ms"]
        size = r.get("batch", r.get("rows"))
        variant = {k: v for k, v in r.items() if k.isupper()}
        if r["kernel"] in ("sdpa", "cublas"):
            base[r["kind"], size] = step_ms
        name = " ".join([r["kind"], r["kernel"], *(f"{k}={v}" for k, v in variant.items())])
        print(f"{name:<58} {size:>4} {step_ms:>9.3f} {r['of_bandwidth']:>12.1%} "
              f"{step_ms / base[r['kind'], size]:>10.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**about, "results": results}, indent=2))
    return 0


def add_parser(sub) -> None:
    from trimkv.bench_decode import ARCHITECTURES

    k = sub.add_parser("kernels", help="decode_linear and decode_attention alone vs cuBLAS and SDPA (--sweep: "
                       "their launch constants)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="qwen3-4b")
    k.add_argument("--rows", type=int, nargs="+", default=[4, 8], help="rows of a step, the batch (default 4 8)")
    k.add_argument("--slots", type=int, default=1152, help="slots attended: M + buffer (default 1024 + 128)")
    k.add_argument("--sweep", action="store_true", help="also time the variants of the kernels' launch constants "
                   "(several minutes: each variant compiles and autotunes anew)")
    k.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    k.set_defaults(func=kernels)
