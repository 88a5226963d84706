"""`python -m trimkv bench decode`: decode throughput with the bounded cache, the setting of the paper's Table 5.

Random weights of a Hugging Face architecture (default Qwen3-4B, bf16, SDPA) with random retention gates; a
random prompt of `context` tokens per row is prefilled in chunks (the bounded policies evict after each),
then `generate` tokens are decoded greedily by `trimkv.decode` (CUDA graphs). Per policy and setting it prints:

- tokens/s = batch * generate / decode time (prefill excluded, as in Table 5), and the paper's number;
- the bandwidth bound: bytes one decode step must read (every weight but the input embedding, plus the
  cache's keys, values and per-token signals over the slots attended) / the device-to-device copy
  bandwidth measured in this run; `bandwidth_fraction` = bound step time / measured step time;
- the eviction share: one compression's time (a captured graph, timed alone) times the compressions
  done, over the decode time;
- the same decode steps through the dynamic cache path stock `generate` uses (`dynamic_ms_per_step`, a
  few steps timed before static decode starts) and the speed-up over it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimkv.bench import _time_ms

PAPER = {  # Table 5 of arXiv 2512.03324 (H200, M = 1024, generate 1024): tokens/s
    ("trimkv", 32768, 4): 130.5, ("trimkv", 16384, 4): 151.0, ("trimkv", 16384, 8): 279.9,
    ("full", 32768, 4): 68.4, ("full", 16384, 4): 114.4, ("full", 16384, 8): 139.0,
}
TARGETS = {("trimkv", 32768, 4): 650.0, ("trimkv", 16384, 8): 1400.0}  # issue 9: >= 5x the paper
ARCHITECTURES = {
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
}


def _setting(text: str) -> tuple[int, int]:
    try:
        context, batch = text.lower().split("x")
        return int(context), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is CONTEXTxBATCH, e.g. 32768x4; got {text!r}") from None


def build_model(architecture: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import trimkv

    spec = dict(ARCHITECTURES[architecture])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        trimkv.attach_gates(model, trimkv.GateConfig())
    return model.eval()


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters=20)
    return 2 * nbytes / (ms / 1e3)


def _step_bytes(model, cache) -> int:
    """Bytes one decode step reads: weights (the input embedding is only gathered) + the attended slots."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:  # untied: the input table is not read whole
        weights -= embedding.numel() * embedding.element_size()
    return weights + sum(sum(t.numel() * t.element_size() for name, t in layer.tensors().items()
                             if name != "positions") for layer in cache.layers)


def run_one(model, policy: str, context: int, batch: int, generate: int, memory_size: int, buffer_size: int,
            prefill_chunk: int, bandwidth: float, dynamic_steps: int, compile: bool, decode_linear: bool,
            profile: int = 0) -> dict:
    import torch

    import trimkv
    from trimkv.compat import generate_cache_kwarg
    from trimkv.decode import StaticDecoder

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kwarg = generate_cache_kwarg(model)
    cache = trimkv.make_cache(policy, memory_size=memory_size, buffer_size=buffer_size, prefill_chunk=prefill_chunk)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits[:, -1]
        end.record()
        torch.cuda.synchronize()
        prefill_ms = start.elapsed_time(end)

        # a few steps through the dynamic path (what stock generate runs), as the baseline; two untimed first
        token = logits.argmax(-1)
        for _ in range(2):
            token = model(input_ids=token[:, None], use_cache=True, **{kwarg: cache}).logits[:, -1].argmax(-1)
        start.record()
        for _ in range(dynamic_steps):
            token = model(input_ids=token[:, None], use_cache=True, **{kwarg: cache}).logits[:, -1].argmax(-1)
        end.record()
        torch.cuda.synchronize()
        dynamic_ms = start.elapsed_time(end) / dynamic_steps

        # + warm-up and capture
        decoder = StaticDecoder(model, cache, generate + 3 + profile, graph=True, compile=compile,
                                decode_linear=decode_linear)
        for _ in range(decoder.warmup + 1):  # eager warm-up steps and the capture
            token = decoder.step(token).argmax(-1)
        compressions_before = decoder.compressions
        torch.cuda.synchronize()
        start.record()
        for _ in range(generate):
            token = decoder.step(token).argmax(-1)
        end.record()
        torch.cuda.synchronize()
        decode_ms = start.elapsed_time(end)
        compressions = decoder.compressions - compressions_before
        kernels = profile_steps(decoder, token, profile) if profile else None
        compress_ms = None
        if decoder._compress_graph is not None:
            decoder.rows.zero_()  # the same work, nothing changed
            compress_ms = _time_ms(decoder._compress_graph.replay, iters=20)
        decoder.close()

    row = measurement(policy, context, batch, generate, cache.memory_size, buffer_size, cache.slots, prefill_ms,
                      decode_ms, _step_bytes(model, cache) / bandwidth * 1e3, dynamic_ms, compress_ms, compressions,
                      torch.cuda.max_memory_allocated())
    row.update(compiled=compile, decode_linear=decode_linear)
    if kernels:
        row["kernels_per_step"] = kernels
    del cache
    return row


def profile_steps(decoder, token, steps: int) -> float:
    """Print torch.profiler's kernel table over `steps` replays of the captured step (where a step's time goes:
    the kernels by total GPU time, with their counts); returns the kernels launched per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    return sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / steps


def measurement(policy: str, context: int, batch: int, generate: int, memory_size: int | None, buffer_size: int,
                slots: int, prefill_ms: float, decode_ms: float, bound_ms: float, dynamic_ms: float,
                compress_ms: float | None, compressions: int, peak_bytes: int) -> dict:
    """One setting's numbers, under the key names `trimkv.report.collect` reads from results/bench (BENCH_KEYS:
    new_tokens, budget, bandwidth_fraction, peak_memory_bytes, ...), with the paper's number and the target."""
    step_ms = decode_ms / generate
    row = {"policy": policy, "context": context, "batch": batch, "new_tokens": generate, "budget": memory_size,
           "buffer_size": buffer_size, "slots": slots, "prefill_s": prefill_ms / 1e3, "decode_s": decode_ms / 1e3,
           "ms_per_step": step_ms, "tokens_per_s": batch * generate / (decode_ms / 1e3),
           "bound_ms_per_step": bound_ms, "bandwidth_fraction": bound_ms / step_ms,
           "dynamic_ms_per_step": dynamic_ms, "speedup_over_dynamic": dynamic_ms / step_ms,
           "compress_ms": compress_ms, "compressions": compressions,
           "eviction_share": (compress_ms * compressions / decode_ms) if compress_ms else 0.0,
           "peak_memory_bytes": peak_bytes}
    paper = PAPER.get((policy, context, batch))
    if paper:
        row["paper_tokens_per_s"], row["over_paper"] = paper, row["tokens_per_s"] / paper
    target = TARGETS.get((policy, context, batch))
    if target:
        row["target_tokens_per_s"], row["over_target"] = target, row["tokens_per_s"] / target
    return row


def write_results(path: Path, rows: list[dict], **about) -> None:
    """`--out`: {"results": rows, **about}, the form `trimkv.report.collect.load_bench` reads (results/bench/
    <model>/metrics.json puts the rows in the report's throughput table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**about, "results": rows}, indent=2, default=str))


def decode(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench decode needs a CUDA GPU")
    # one compiled step per policy and batch shape: more than dynamo's default 8 recompilations
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = build_model(args.architecture)
    bandwidth = copy_bandwidth()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_bandwidth_TBps": bandwidth / 1e12,
                      "weights_GB": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9}), flush=True)
    rows = []
    for context, batch in args.settings:
        for policy in args.policies:
            row = run_one(model, policy, context, batch, args.generate, args.memory_size, args.buffer_size,
                          args.prefill_chunk, bandwidth, args.dynamic_steps, args.compile, args.decode_linear,
                          args.profile)
            row.update(model=args.architecture, device=torch.cuda.get_device_name())
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'policy':<10} {'context':>7} {'batch':>5} {'tok/s':>8} {'paper':>7} {'target':>7} {'ms/step':>8} "
          f"{'of bound':>8} {'evict':>6} {'vs dynamic':>10} {'products':>8}")
    for r in rows:
        print(f"{r['policy']:<10} {r['context']:>7} {r['batch']:>5} {r['tokens_per_s']:>8.1f} "
              f"{r.get('paper_tokens_per_s', float('nan')):>7.1f} {r.get('target_tokens_per_s', float('nan')):>7.0f} "
              f"{r['ms_per_step']:>8.2f} {r['bandwidth_fraction']:>8.1%} {r['eviction_share']:>6.1%} "
              f"{r['speedup_over_dynamic']:>9.1f}x {'triton' if r['decode_linear'] else 'cublas':>8}")
    if args.out:
        write_results(args.out, rows, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                      copy_bandwidth_Bps=bandwidth, args={k: v for k, v in vars(args).items() if k != "func"})
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("decode", help="decode tokens/s with CUDA-graph static decode (the paper's Table 5)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--settings", type=_setting, nargs="+", default=[(32768, 4), (16384, 4), (16384, 8)],
                   metavar="CONTEXTxBATCH", help="prompt length and batch (default: Table 5's 32768x4 16384x4 16384x8)")
    d.add_argument("--policies", nargs="+", default=["trimkv", "full", "streaming", "snapkv"])
    d.add_argument("--generate", type=int, default=1024, help="tokens decoded per row (default 1024)")
    d.add_argument("--memory-size", type=int, default=1024, help="M (default 1024, as Table 5)")
    d.add_argument("--buffer-size", type=int, default=128, help="slots beyond M before compressing (default 128)")
    d.add_argument("--prefill-chunk", type=int, default=4096, help="prefill chunk (default 4096)")
    d.add_argument("--dynamic-steps", type=int, default=8, help="steps timed on the dynamic path (baseline)")
    d.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="qwen3-4b")
    d.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the decode step before capturing it (default: on)")
    d.add_argument("--decode-linear", action=argparse.BooleanOptionalAction, default=True,
                   help="the step's linear layers run trimkv.kernels.decode_linear instead of cuBLAS (default: on)")
    d.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, print torch.profiler's kernel table over this many decode steps "
                        "(default 0: off)")
    d.add_argument("--out", type=Path, default=None,
                   help="write the results as JSON here; as results/bench/<name>/metrics.json the report reads them")
    d.set_defaults(func=decode)
