"""The offline smoke run of the library, until the Snakemake presets land: no GPU, no network.

Builds a tiny random-weight Qwen3, attaches gates with spread-out retention, saves them, loads them
back through `load_pretrained`, and generates with every policy over a budget sweep, writing
`<out>/report.json` and printing memory held and agreement with the full-cache tokens. Random weights
carry no knowledge: this checks the machinery end to end, not the paper's accuracy claim.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import trimkv
from trimkv.compat import generate_cache_kwarg


def run(out: Path, budgets=(8, 16, 32, 64), prompt_len: int = 96, new_tokens: int = 32, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=1024)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    base.save_pretrained(out / "base")
    trimkv.attach_gates(base, trimkv.GateConfig(bias_init=2.0, init_std=0.2))
    trimkv.save_gates(base, out / "gates", base_model=str(out / "base"))
    model = trimkv.load_pretrained(out / "gates").eval()

    ids = torch.randint(0, config.vocab_size, (2, prompt_len))
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    key = generate_cache_kwarg(model)
    runs = []
    reference = None
    for policy, sweep in [("full", [None]), ("trimkv", list(budgets))]:
        for budget in sweep:
            cache = trimkv.make_cache(policy, memory_size=budget, buffer_size=8)
            with torch.no_grad():
                tokens = model.generate(ids, **{key: cache}, **gen)[:, prompt_len:]
            reference = tokens if reference is None else reference
            runs.append({"policy": policy, "memory_size": budget, "slots_per_head": cache.slots,
                         "cache_bytes": cache.nbytes(),
                         "token_agreement_with_full": float((tokens == reference).float().mean())})
    report = {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "batch": 2, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict) -> str:
    lines = [f"{'policy':8} {'budget':>6} {'slots':>6} {'cache KiB':>10} {'agree w/ full':>14}"]
    for r in report["runs"]:
        lines.append(f"{r['policy']:8} {str(r['memory_size'] or '-'):>6} {r['slots_per_head']:>6} "
                     f"{r['cache_bytes'] / 1024:>10.1f} {r['token_agreement_with_full']:>14.2f}")
    return "\n".join(lines)
