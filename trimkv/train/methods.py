"""What `python -m trimkv train --method NAME` trains on the frozen base model, and how.

    trimkv   retention gates (trimkv/gates.py); distillation + capacity (losses.py); the paper's method
    locret   LocRet retaining heads (trimkv/locret.py); SmoothL1 to the causal importance score + smoothness
             (locret_loss.py); the LocRet baseline
    seerattn_r  SeerAttention-R AttnGates (trimkv/seer.py); KL to the base model's block-pooled attention
             (seer_loss.py); the SeerAttention-R baseline

A method is the handful of things that differ: which modules it adds, the attention implementation the model
trains with, the objective and the parts of it worth logging, and how its modules are saved. The trainer owns the
rest (data, optimizer, schedule, checkpoints and resume, processes, DeepSpeed) and treats every method alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Method:
    name: str
    logged: tuple[str, ...]  # the objective's parts logged every step, "loss" first
    attach: Callable[[nn.Module, Any], None]  # (model, cfg): add fresh trainable modules
    parameters: Callable[[nn.Module], dict[str, Tensor]]  # the trainable tensors by full parameter name
    attention: Callable[[Any, torch.device], str]  # (cfg, device) -> backend; the model trains with trimkv_<it>
    objective: Callable[..., dict[str, Tensor]]  # (model, ids, cfg, teacher_impl, length) -> parts, "loss" included
    save: Callable[..., Any]  # (model, path, base_model=, revision=, extra=), like trimkv.save_gates
    describe: Callable[[nn.Module], dict]  # the modules' config, for params.json


# ---- trimkv: the paper --------------------------------------------------------------------------------------------

def _attach_gates(model, cfg) -> None:
    import trimkv

    trimkv.attach_gates(model, trimkv.GateConfig(intermediate_size=cfg.gate_intermediate_size,
                                                 bias_init=cfg.gate_bias_init))


def _gate_attention(cfg, device: torch.device) -> str:
    from trimkv import kernels

    auto = ("triton" if kernels.available() else "flex") if device.type == "cuda" else "reference"
    attention = cfg.attention if cfg.attention != "auto" else auto
    if attention in ("flex", "triton") and device.type != "cuda":
        raise ValueError(f"--attention {attention} trains on CUDA only; use reference")
    return attention


def _gate_objective(model, ids, cfg, teacher: str, length: int) -> dict[str, Tensor]:
    from trimkv.train import losses

    weights = {"kl": cfg.kl_weight, "ntp": cfg.ntp_weight, "capacity": cfg.capacity_weight}
    return losses.objective(model, ids, cfg.memory_size, teacher, weights=weights, capacity_form=cfg.capacity_form,
                            logit_block=cfg.logit_block, length=length)


def _gate_parameters(model) -> dict[str, Tensor]:
    from trimkv.gates import gate_parameters

    return gate_parameters(model)


def _save_gates(model, path, **kwargs):
    from trimkv.checkpoint import save_gates

    return save_gates(model, path, **kwargs)


TRIMKV = Method("trimkv", ("loss", "kl", "ntp", "capacity", "beta_mean"), _attach_gates, _gate_parameters,
                _gate_attention, _gate_objective, _save_gates,
                lambda model: {"gate_config": model.trimkv_gate_config.to_dict()})


# ---- the learned baselines: small modules trained on a frozen base model through stock SDPA ------------------------

def _recording_sdpa(method: str, modules: str, loss_module: str):
    """The attention of a baseline's training: stock SDPA that also records what the loss needs, registered by
    importing trimkv.train.<loss_module>. Checkpointing has nothing to save: only the small modules have grads."""

    def attention(cfg, device: torch.device) -> str:
        if cfg.gradient_checkpointing:
            raise ValueError(f"--gradient-checkpointing has nothing to save with --method {method}: the frozen base "
                             f"model builds no autograd graph, only the small {modules} do")
        return importlib.import_module(f"trimkv.train.{loss_module}").IMPLEMENTATION.removeprefix("trimkv_")

    return attention


# ---- locret: the LocRet baseline ----------------------------------------------------------------------------------

def _attach_heads(model, cfg) -> None:
    from trimkv.locret import LocretConfig, attach_retaining_heads

    attach_retaining_heads(model, LocretConfig(intermediate_size=cfg.locret_intermediate_size))


def _head_objective(model, ids, cfg, teacher: str, length: int) -> dict[str, Tensor]:
    from trimkv.train import locret_loss

    return locret_loss.objective(model, ids, cfg.smoothness_weight, length=length)


def _head_parameters(model) -> dict[str, Tensor]:
    from trimkv.locret import head_parameters

    return head_parameters(model)


def _save_heads(model, path, **kwargs):
    from trimkv.locret import save_retaining_heads

    return save_retaining_heads(model, path, **kwargs)


LOCRET = Method("locret", ("loss", "cis", "smoothness", "cis_mean"), _attach_heads, _head_parameters,
                _recording_sdpa("locret", "heads", "locret_loss"), _head_objective, _save_heads,
                lambda model: {"locret_config": model.trimkv_locret_config.to_dict()})

# ---- seerattn_r: the SeerAttention-R baseline --------------------------------------------------------------------

def _attach_seer(model, cfg) -> None:
    from trimkv.seer import SeerConfig, attach_attn_gates

    attach_attn_gates(model, SeerConfig(block_size=cfg.seer_block_size, gate_hidden_size=cfg.seer_gate_hidden_size))


def _seer_objective(model, ids, cfg, teacher: str, length: int) -> dict[str, Tensor]:
    from trimkv.train import seer_loss

    return seer_loss.objective(model, ids, cfg.seer_loss_slice, length=length)


def _seer_parameters(model) -> dict[str, Tensor]:
    from trimkv.seer import gate_parameters

    return gate_parameters(model)


def _save_seer(model, path, **kwargs):
    from trimkv.seer import save_attn_gates

    return save_attn_gates(model, path, **kwargs)


SEERATTN_R = Method("seerattn_r", ("loss", "target_entropy"), _attach_seer, _seer_parameters,
                    _recording_sdpa("seerattn_r", "gates", "seer_loss"), _seer_objective, _save_seer,
                    lambda model: {"seer_config": model.trimkv_seer_config.to_dict()})

METHODS = {m.name: m for m in (TRIMKV, LOCRET, SEERATTN_R)}
