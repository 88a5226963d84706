"""`python -m trimkv <command>`: the command line the workflow rules call. Each command has --help."""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a bounded KV cache and print cache statistics",
        description="Generate from a prompt with any eviction policy. --model is a trimkv checkpoint (ours or "
        "the released upstream format), a Hub id of one, or a plain Hugging Face model (policies without gates).",
    )
    p.add_argument("--model", required=True, help="checkpoint dir, Hub id, or plain HF causal LM")
    p.add_argument("--policy", default="trimkv", help="eviction policy (see trimkv.POLICIES; default: trimkv)")
    p.add_argument("--memory-size", type=int, default=None,
                   help="tokens kept per layer and KV head (default: the checkpoint's training value)")
    p.add_argument("--buffer-size", type=int, default=None,
                   help="tokens added before compressing back to --memory-size (default: checkpoint's, else 128)")
    p.add_argument("--sink", type=int, default=None, help="always keep the first N tokens (streaming: default 4)")
    p.add_argument("--window", type=int, default=0, help="always keep the last N tokens")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="run a long prompt in chunks of N tokens, evicting after each (bounded prefill memory)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_generate)


def _load_model(path: str, revision: str | None, dtype: str, device: str):
    """A gate checkpoint (ours or upstream, local or Hub) with its base model, or a plain HF model + hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    import trimkv
    from trimkv.checkpoint import NOT_A_CHECKPOINT

    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    try:
        return trimkv.load_pretrained(path, revision=revision, dtype=torch_dtype, device=device)
    except ValueError as e:
        if NOT_A_CHECKPOINT not in str(e):
            raise
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch_dtype or "auto",
                                                 attn_implementation="sdpa").to(device)
    return trimkv.prepare(model)


def _generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    import trimkv
    from trimkv.compat import generate_cache_kwarg

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _load_model(args.model, args.revision, args.dtype, device).eval()
    defaults = getattr(model, "trimkv_defaults", {}) or {}
    memory_size = args.memory_size if args.memory_size is not None else defaults.get("memory_size")
    buffer_size = args.buffer_size if args.buffer_size is not None else defaults.get("buffer_size", 128)
    cache = trimkv.make_cache(args.policy, memory_size=memory_size, buffer_size=buffer_size,
                              sink=args.sink, window=args.window, prefill_chunk=args.prefill_chunk)
    if "log_beta" in cache.policy.needs and not hasattr(model.model.layers[0].self_attn, "retention_gate"):
        raise ValueError(f"policy {args.policy!r} needs retention gates; {args.model} has none (use a trimkv checkpoint)")

    source = getattr(model, "trimkv_source", {}) or {}
    tokenizer = AutoTokenizer.from_pretrained(source.get("base_model") or args.model)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                             **{generate_cache_kwarg(model): cache}, **sampling)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    stats = cache.stats()
    kept = [int((cache.kept_positions(i)[0] >= 0).sum(-1).float().mean()) for i in range(len(cache.layers))]
    report = {"text": text, "generated_tokens": int(new_tokens.numel()), "tokens_seen": stats["tokens_seen"][0],
              "kept_per_layer": kept, "slots_per_head": stats["slots_per_head"], "cache_bytes": stats["nbytes"],
              "policy": args.policy, "memory_size": memory_size, "buffer_size": buffer_size}
    if args.json:
        print(json.dumps(report))
    else:
        print(text)
        print(f"\n-- policy {args.policy} (memory {memory_size}, buffer {buffer_size}): "
              f"{report['tokens_seen']} tokens seen, {report['generated_tokens']} generated, "
              f"kept per layer {kept}, {report['slots_per_head']} slots per head, "
              f"{report['cache_bytes'] / 2**20:.2f} MiB cache", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trimkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    from trimkv import bench, data, tracking
    from trimkv.eval import runner
    from trimkv.report import cli as report
    from trimkv.synthetic import cli as synthetic
    from trimkv.train import select, trainer

    trainer.add_parser(sub)
    select.add_parser(sub)
    runner.add_parser(sub)
    data.add_parser(sub)
    bench.add_parser(sub)
    report.add_parser(sub)
    tracking.add_parser(sub)
    synthetic.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad user input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
