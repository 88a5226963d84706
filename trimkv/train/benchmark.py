"""Speed and memory of one gate-training step: `python -m trimkv.train.benchmark --lengths 4096 16384`.

Builds a random-weight model of a real shape (default: Qwen3-1.7B's config, no download), attaches gates, and
times full optimizer steps of the trainer's objective (teacher + student forward, backward into the gates,
AdamW) on random tokens: the same code path as `python -m trimkv train`, without data loading. Prints one JSON
line per (length, gradient checkpointing) with tokens/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Qwen/Qwen3-1.7B's config.json (architecture fields only)
QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def build(shape: dict, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM, Qwen3Config

    import trimkv
    from trimkv.compat import enable_gradient_checkpointing
    from trimkv.gates import decoder_layers, gate_parameters, gates

    with device:
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), attn_implementation="sdpa", dtype=dtype)
    model.requires_grad_(False)
    trimkv.attach_gates(model)
    for gate in gates(model):
        gate.float()
    model.eval()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
        for layer in decoder_layers(model):
            layer.training = True
    return model, list(gate_parameters(model).values())


def run(lengths: list[int], steps: int, memory_size: int, attention: str, checkpointing: list[bool],
        shape: dict) -> list[dict]:
    from trimkv.train.losses import objective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for gc in checkpointing:
        model, params = build(shape, device, dtype, gc)
        teacher = model.config._attn_implementation
        model.config._attn_implementation = f"trimkv_{attention}"
        optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
        for T in lengths:
            ids = torch.randint(0, shape["vocab_size"], (1, T), device=device)
            times, parts = [], {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(steps + 1):  # the first step compiles (flex attention) and is not timed
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    parts = objective(model, ids, memory_size, teacher)
                parts["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:
                    times.append(time.perf_counter() - t0)
            seconds = sorted(times)[len(times) // 2]
            record = {"model": f"{shape['num_hidden_layers']}L d{shape['hidden_size']}", "length": T,
                      "gradient_checkpointing": gc, "attention": attention, "dtype": str(dtype),
                      "step_s": round(seconds, 4), "tokens_per_s": round(T / seconds, 1),
                      "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                      if device.type == "cuda" else None,
                      **{k: round(float(v.detach()), 5) for k, v in parts.items()}}
            print(json.dumps(record), flush=True)
            results.append(record)
        del model, params, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def breakdown(T: int, shape: dict, memory_size: int) -> dict:
    """Seconds of each part of one step at length T (CUDA): where the time goes."""
    from trimkv.train.losses import GateRecorder, attention_implementation, capacity_loss, distillation_losses

    device, dtype = torch.device("cuda"), torch.bfloat16
    model, _ = build(shape, device, dtype, False)  # its own attention implementation is the teacher's
    ids = torch.randint(0, shape["vocab_size"], (1, T), device=device)
    times = {}

    def timed(name, fn, *args):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn(*args)
        torch.cuda.synchronize()
        times[name] = round(time.perf_counter() - t0, 4)
        return result

    for _ in range(2):  # the second pass is timed, after compilation
        with torch.autocast("cuda", dtype=dtype):
            with torch.no_grad():
                th = timed("teacher_forward", lambda: model.model(input_ids=ids, use_cache=False).last_hidden_state)
            with attention_implementation(model, "trimkv_flex"), GateRecorder(model) as rec:
                sh = timed("student_forward", lambda: model.model(input_ids=ids, use_cache=False).last_hidden_state)
            kl, ntp = timed("kl_ntp", distillation_losses, sh, th, ids, model.get_output_embeddings())
            cap = timed("capacity_forward", capacity_loss, rec.log_betas, memory_size)
        with attention_implementation(model, "trimkv_flex"):
            timed("backward", (kl + ntp + cap).backward)
        lb = [x.detach().clone().requires_grad_(True) for x in rec.log_betas]
        timed("capacity_alone_fwd_bwd", lambda: capacity_loss(lb, memory_size).backward())  # noqa: B023 (run now)
        model.zero_grad(set_to_none=True)
    record = {"length": T, "breakdown_s": times}
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m trimkv.train.benchmark", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384], help="sequence lengths")
    p.add_argument("--steps", type=int, default=3, help="timed steps per length (after one warm-up step)")
    p.add_argument("--memory-size", type=int, default=1024, help="budget M of the capacity loss")
    p.add_argument("--attention", choices=("flex", "triton", "reference"), default="flex", help="student attention backend")
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="both", help="gradient checkpointing")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick checks)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d=64 model (CPU smoke test)")
    p.add_argument("--breakdown", action="store_true", help="time each part of a step instead (CUDA only)")
    args = p.parse_args()
    shape = dict(QWEN3_1_7B)
    if args.tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=97)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.breakdown:
        for T in args.lengths:
            breakdown(T, shape, args.memory_size)
        return
    gc = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    run(args.lengths, args.steps, args.memory_size, args.attention, gc, shape)


if __name__ == "__main__":
    main()
