"""`python -m trimkv bench ...`: speed measurements that print ratios against a baseline timed in the
same run. Numbers measured on the H200 are recorded in docs/benchmarks.md with the command used.

bench attention: retention-gated attention fwd+bwd (flex, and the plain reference where it fits in
memory) against SDPA's flash path without the retention bias, at Qwen3-1.7B head shapes, bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention(args) -> int:
    import torch
    import torch.nn.functional as F

    from trimkv.attention import retention_attention_flex, retention_attention_reference

    if not torch.cuda.is_available():
        raise ValueError("bench attention needs a CUDA GPU")
    rows = []
    for T in args.lengths:
        torch.manual_seed(0)
        B, Hq, Hkv, D = 1, args.heads, args.kv_heads, args.head_dim
        make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
        q, k, v = make(B, Hq, T, D), make(B, Hkv, T, D), make(B, Hkv, T, D)
        log_beta = (-torch.rand(B, Hkv, T, device="cuda") * 0.01).requires_grad_()
        grad = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

        def flex():
            retention_attention_flex(q, k, v, log_beta).backward(grad)

        row = {"T": T, "sdpa_ms": _time_ms(sdpa), "flex_ms": _time_ms(flex)}
        row["flex_over_sdpa"] = row["flex_ms"] / row["sdpa_ms"]
        if T <= args.reference_max:
            exact = retention_attention_reference(q.float(), k.float(), v.float(), log_beta)
            row["flex_max_abs_err_vs_fp32"] = float((retention_attention_flex(q, k, v, log_beta).float() - exact)
                                                   .abs().max())
            row["reference_ms"] = _time_ms(lambda: retention_attention_reference(q, k, v, log_beta).backward(grad))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": vars(args) | {"func": None},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="GPU speed benchmarks (ratios against a baseline timed in the same run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    a = sub.add_parser("attention", help="retention-gated attention fwd+bwd vs SDPA (flash)")
    a.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768], help="sequence lengths")
    a.add_argument("--heads", type=int, default=16, help="query heads (Qwen3-1.7B: 16)")
    a.add_argument("--kv-heads", type=int, default=8, help="KV heads (Qwen3-1.7B: 8)")
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--reference-max", type=int, default=4096, help="also time the plain reference up to this length")
    a.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a.set_defaults(func=attention)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m trimkv.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(ns.func(ns))
