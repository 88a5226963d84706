"""`python -m trimkv synthetic generate|tokenizer|pretrain`: the offline preset's data and base model.

Wired into the main CLI by `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimkv.synthetic import task as task_module

_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `synthetic` command (with its subcommands) to the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "synthetic", help="offline task: generate its splits, build its tokenizer, pretrain a tiny base model",
        description="The offline preset: a synthetic long-horizon recall task and a tiny Qwen3-architecture "
        "base model pretrained on it from scratch on CPU.\n\n" + task_module.__doc__.split("\n\n", 1)[1],
        formatter_class=_FORMATTER,
    )
    sub = parser.add_subparsers(dest="synthetic_command", required=True, metavar="SUBCOMMAND")
    _add_generate(sub)
    _add_tokenizer(sub)
    _add_pretrain(sub)
    return parser


def _task_args(p) -> None:
    d = task_module.TaskConfig()
    g = p.add_argument_group("task")
    g.add_argument("--length", type=int, default=d.length,
                   help=f"tokens per sequence, prompt + answers, <s> and </s> included (default {d.length}; "
                   "keep it >= 8x the smallest budget evaluated)")
    g.add_argument("--keys", type=int, default=d.keys, help=f"facts per sequence = answers (default {d.keys})")
    g.add_argument("--values", type=int, default=d.values, help=f"values per key (default {d.values})")
    g.add_argument("--filler", type=int, default=d.filler, help=f"distinct filler words (default {d.filler})")
    g.add_argument("--filler-zipf", type=float, default=d.filler_zipf,
                   help=f"Zipf exponent of the filler words' frequencies, ranking shuffled per sequence; 0 = "
                   f"uniform (default {d.filler_zipf})")
    g.add_argument("--distractor-keys", type=int, default=d.distractor_keys,
                   help=f"keys of the short-lived pairs, each asked for by its cue q<key> a few words later and "
                   f"never recalled (default {d.distractor_keys})")
    g.add_argument("--distractors", type=float, default=d.distractors,
                   help=f"short-lived pair episodes per prompt token, up to --distractor-keys per sequence "
                   f"(default {d.distractors})")
    g.add_argument("--distractor-gap", type=int, default=d.distractor_gap,
                   help=f"most filler words between a short-lived pair and its cue (default {d.distractor_gap})")
    g.add_argument("--facts-span", type=float, default=d.facts_span,
                   help=f"facts lie in this leading fraction of the prompt (default {d.facts_span})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"task seed (default {d.seed})")


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="write train/validation/test splits (jsonl) + task.json + manifest.json",
        description="Write <out>/{train,validation,test}.jsonl (one sequence per line: id, split, prompt, "
        "completion, text = prompt + completion (a plain-text record; a trainer appends </s>), answers, "
        "fact_positions, distractor_positions, values), task.json (the task "
        "settings) and manifest.json (sizes and sha256 of each file). Deterministic per --seed; the splits "
        "never share a fact assignment. Pretraining streams further train samples beyond the train split.",
        formatter_class=_FORMATTER)
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. resources/data/synthetic")
    p.add_argument("--train", type=int, default=4096, help="train split size (default 4096)")
    p.add_argument("--validation", type=int, default=512, help="validation split size (default 512)")
    p.add_argument("--test", type=int, default=512, help="test split size (default 512)")
    _task_args(p)
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    for name in ("train", "validation", "test"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    config = task_module.TaskConfig(length=args.length, keys=args.keys, values=args.values, filler=args.filler,
                                    filler_zipf=args.filler_zipf, distractor_keys=args.distractor_keys,
                                    distractors=args.distractors, distractor_gap=args.distractor_gap,
                                    facts_span=args.facts_span, seed=args.seed)
    manifest = task_module.write_splits(args.out, config, {"train": args.train, "validation": args.validation,
                                                           "test": args.test})
    sizes = ", ".join(f"{k} {v}" for k, v in manifest["splits"].items())
    print(f"wrote {args.out}: {sizes} sequences of {config.length} tokens "
          f"({config.keys} facts, suggested budgets {config.default_budgets()})")
    return 0


def _add_tokenizer(sub) -> None:
    p = sub.add_parser(
        "tokenizer", help="save the task's word-level tokenizer (AutoTokenizer-loadable)",
        description="Save the word-level tokenizer of the task in --data (its task.json) to --out, loadable "
        "with AutoTokenizer.from_pretrained. `pretrain` also saves it beside the model.",
        formatter_class=_FORMATTER)
    p.add_argument("--data", type=Path, required=True, help="directory written by `synthetic generate`")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=_tokenizer)


def _tokenizer(args) -> int:
    from trimkv.synthetic.tokenizer import save_tokenizer

    tokenizer = save_tokenizer(task_module.read_config(args.data), args.out)
    print(f"wrote {args.out}: {len(tokenizer)} tokens")
    return 0


def _add_pretrain(sub) -> None:
    from trimkv.synthetic.pretrain import ModelShape, PretrainConfig

    d, s = PretrainConfig(), ModelShape()
    p = sub.add_parser(
        "pretrain", help="pretrain the tiny Qwen3-architecture base model on the task (CPU, minutes)",
        description=__import__("trimkv.synthetic.pretrain").synthetic.pretrain.__doc__ +
        "\nOutput: a Hugging Face model folder (config.json, model.safetensors, tokenizer, task.json) and "
        "metrics.json (loss curve, validation accuracy, timings). A killed run resumes from "
        "<out>/pretrain_checkpoint.pt (saved every --eval-every steps).",
        formatter_class=_FORMATTER)
    p.add_argument("--data", type=Path, required=True, help="directory written by `synthetic generate`")
    p.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. results/base/synthetic")
    p.add_argument("--steps", type=int, default=d.steps, help=f"maximum optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW (default {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warmup steps (default {d.warmup})")
    p.add_argument("--curriculum", type=int, nargs="*", default=list(d.curriculum),
                   help=f"shorter lengths trained first, each until recent batches reach --curriculum-accuracy "
                   f"(default {' '.join(map(str, d.curriculum))}; none: train at the task length only)")
    p.add_argument("--curriculum-accuracy", type=float, default=d.curriculum_accuracy,
                   help=f"answer accuracy that ends a curriculum stage (default {d.curriculum_accuracy})")
    p.add_argument("--prompt-weight", type=float, default=d.prompt_weight,
                   help=f"loss = CE(answers) + W * CE(prompt tokens), each a mean over its tokens; 0 = answers "
                   f"only (default {d.prompt_weight})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"validate and checkpoint every N steps (default {d.eval_every})")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help=f"validation sequences for the periodic accuracy (default {d.eval_samples})")
    p.add_argument("--target-accuracy", type=float, default=d.target_accuracy,
                   help=f"stop once teacher-forced validation accuracy at full length reaches this "
                   f"(default {d.target_accuracy}; 1.0 = run all --steps)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"initialisation seed (default {d.seed})")
    p.add_argument("--layers", type=int, default=s.layers, help=f"decoder layers (default {s.layers})")
    p.add_argument("--hidden", type=int, default=s.hidden, help=f"model width (default {s.hidden})")
    p.add_argument("--intermediate", type=int, default=s.intermediate, help=f"MLP width (default {s.intermediate})")
    p.add_argument("--heads", type=int, default=s.heads, help=f"query heads (default {s.heads})")
    p.add_argument("--kv-heads", type=int, default=s.kv_heads, help=f"key/value heads (default {s.kv_heads})")
    p.add_argument("--head-dim", type=int, default=s.head_dim, help=f"head dimension (default {s.head_dim})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> int:
    import torch

    from trimkv.synthetic.pretrain import ModelShape, PretrainConfig, pretrain

    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    shape = ModelShape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=args.head_dim)
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         curriculum=tuple(args.curriculum), curriculum_accuracy=args.curriculum_accuracy,
                         prompt_weight=args.prompt_weight, eval_every=args.eval_every, eval_samples=args.eval_samples,
                         target_accuracy=args.target_accuracy, seed=args.seed, shape=shape)
    metrics = pretrain(args.data, args.out, cfg, resume=not args.no_resume, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("steps", "train_seconds", "train_cpu_seconds", "final_loss",
                                              "validation_accuracy_teacher_forced",
                                              "validation_accuracy_full_cache")}))
    print(f"wrote {args.out}")
    return 0
