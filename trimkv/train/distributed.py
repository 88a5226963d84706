"""Processes of `python -m trimkv train`: one, several under torchrun (data parallel), or DeepSpeed ZeRO-2.

Data parallel without the DDP wrapper: the trainer calls the decoder directly (it needs hidden states, not
full-vocabulary logits), and the gates are all that trains, so their gradients are averaged here with one flat
all-reduce per optimizer step. Every process walks the same data stream and keeps every world-th sequence.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def setup(device_name: str | None, deepspeed: bool) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call created the process group) from the launcher's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name:
        device = torch.device(device_name)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:
        import deepspeed as ds

        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)  # a single process without a launcher
        ds.init_distributed(dist_backend=backend)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
        return rank, world, device, True
    return rank, world, device, False


def cleanup(own_group: bool) -> None:
    """Destroy the process group if `setup` created it (torchrun). DeepSpeed keeps its own handles on its group,
    so that one stays until the process exits (a later DeepSpeed run in the same process reuses it)."""
    if own_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def any_process(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process if it is true on any (so that none waits in a collective for the others)."""
    if world == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value > 0)


def sync_and_clip(params: list[torch.Tensor], world: int, max_norm: float) -> float:
    """Average gate gradients over processes (one flat all-reduce), then clip; returns the norm before clipping."""
    if world > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params]) / world
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def read_deepspeed_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def fill_deepspeed_config(ds: dict, path: str, grad_accum: int, max_grad_norm: float, world: int,
                          dtype: torch.dtype) -> None:
    """Fill the config's "auto" values from the trainer's options; an explicit value that disagrees is an error."""
    ours = {("train_micro_batch_size_per_gpu",): 1, ("gradient_accumulation_steps",): grad_accum,
            ("train_batch_size",): grad_accum * world, ("gradient_clipping",): max_grad_norm,
            ("bf16", "enabled"): dtype == torch.bfloat16, ("fp16", "enabled"): False}
    for keys, value in ours.items():
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        found = node.get(keys[-1], "auto")
        if found == "auto":
            node[keys[-1]] = value
        elif found != value:
            raise ValueError(f"{path}: {'.'.join(keys)} is {found!r} but the options give {value!r}; "
                             'set it to "auto"')
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: remove 'optimizer'/'scheduler': the trainer builds AdamW + cosine itself")


def gather_fp32_gates(model, engine, parameters: dict | None = None) -> None:
    """Under DeepSpeed bf16 the module's gates are bf16 copies: put the fp32 master weights back before saving.
    parameters: the trained tensors by name (default: the gates)."""
    if engine is None:
        return
    from deepspeed.utils import safe_get_full_fp32_param

    from trimkv.gates import gate_parameters

    for p in (parameters if parameters is not None else gate_parameters(model)).values():
        full = safe_get_full_fp32_param(p)  # a collective: every process calls it
        if full is not None:
            p.data = full.detach().float().clone()
