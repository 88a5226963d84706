"""Training checkpoints: OUT/checkpoints/step-NNNNNNNN/, one directory per saved step.

    trimkv_gates.safetensors, trimkv_config.json   the gates (trimkv.save_gates; loadable as is), or with
                                                   --method locret locret_heads.safetensors, locret_config.json
    optimizer.pt, scheduler.pt                     AdamW and the schedule (DeepSpeed: deepspeed/ instead)
    rng-rank{r}.pt                                 each process's torch / CUDA / Python RNG state
    trainer_state.pt                               step, data position, metrics so far, the options, world size

A checkpoint is written into a hidden temp directory and renamed into place, so a directory named step-N is
always complete; the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from trimkv.train.distributed import barrier

STATE_FILE = "trainer_state.pt"
# Options that may differ when resuming: they do not change the training trajectory up to the saved step.
RESUMABLE_CHANGES = {"out", "resume", "max_steps", "save_every", "keep_checkpoints", "log_every", "device",
                     "gradient_checkpointing", "logit_block"}


def gate_extra(cfg, step: int, tokens: int) -> dict:
    """What the gate files record about their training (load_pretrained reads memory_size as the default budget)."""
    return {"memory_size": cfg.memory_size, "max_length": cfg.max_length, "capacity_form": cfg.capacity_form,
            "steps": step, "train_tokens": tokens}


def finished(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints in ckpt_dir, oldest first."""
    return sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).is_file())


def find(cfg, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: --resume PATH, else (auto) the newest one in ckpt_dir, else None."""
    done = finished(ckpt_dir)
    if cfg.resume == "never":
        if done:
            raise ValueError(f"{ckpt_dir} holds checkpoints and --resume never would overwrite them: "
                             "remove them or use another --out")
        return None
    if cfg.resume != "auto":
        if not (Path(cfg.resume) / STATE_FILE).is_file():
            raise ValueError(f"--resume {cfg.resume}: not a training checkpoint (no {STATE_FILE})")
        return Path(cfg.resume)
    return done[-1] if done else None


def save(path: Path, cfg, model, optimizer, scheduler, engine, data_state: dict, state: dict, rank: int,
         world: int) -> Path:
    """Everything needed to continue exactly. Every process calls it (RNG states; DeepSpeed's shards)."""
    from trimkv.train.methods import METHODS

    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    torch.save(_rng_state(next(model.parameters()).device), tmp / f"rng-rank{rank}.pt")
    if engine is not None:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        METHODS[cfg.method].save(model, tmp, base_model=cfg.model, revision=cfg.revision,
                                 extra=gate_extra(cfg, state["step"], state["tokens"]))
        if engine is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({**state, "data": data_state, "config": asdict(cfg), "world_size": world}, tmp / STATE_FILE)
    barrier(world)
    if rank == 0:
        if path.exists():  # the same step again (a rerun from an older checkpoint): swap, never leave none
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        for stale in finished(path.parent)[: -cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(world)
    return path


def load(path: Path, cfg, model, optimizer, scheduler, engine, stream, rank: int, world: int, log) -> dict:
    """Restore gates, optimizer, scheduler, data position and RNG states; returns the trainer's state dict."""
    from trimkv.checkpoint import read_checkpoint
    from trimkv.train.methods import METHODS

    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    changed = [k for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v]
    if changed:
        k = changed[0]
        raise ValueError(f"cannot resume from {path}: --{k.replace('_', '-')} was {saved['config'][k]!r}, now "
                         f"{getattr(cfg, k)!r} (use the same options, or another --out / --resume never)")
    if engine is not None:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    else:
        tensors = read_checkpoint(path).tensors
        with torch.no_grad():
            for name, p in METHODS[cfg.method].parameters(model).items():
                p.copy_(tensors[name])
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    stream.load_state_dict(saved["data"])
    rng_file = path / f"rng-rank{rank}.pt"
    if saved["world_size"] == world and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False), next(model.parameters()).device)
    else:
        log(f"warning: checkpoint written by {saved['world_size']} process(es), now {world}: "
            "RNG states not restored (the data order is global and continues exactly)")
    return {k: saved[k] for k in ("step", "history", "tokens", "elapsed_s")}


def write_json(path: Path, obj) -> None:
    """Atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
