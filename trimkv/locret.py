"""LocRet retaining heads: one small MLP per decoder layer that predicts how much attention each token will get.

Source: Huang et al., 2024, "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining
Heads", arXiv 2410.01805, and its released code (github.com/huangyuxiang03/Locret). For token j of a layer with
query / key / value projections q_j (H_q * D values), k_j and v_j (H_kv * D each), the layer's head predicts one
score per KV head,

    s_hat_j = W2 act(W1 [q_j; k_j; v_j])          W1: (H_q + 2 H_kv) D -> 1024, W2: 1024 -> H_kv, no biases

trained (train/locret_loss.py, base model frozen) to regress the token's causal importance score, the largest
attention it receives from a later query of any query head of its group. At inference (policies/locret.py) each
(sequence, layer, KV head) keeps the tokens with the highest s_hat, plus the most recent ones.

Where each choice comes from:
    paper          input [Q; K; V] of the token, one output per KV head, the CIS regression target;
    released code  Q, K, V are the raw projections (before RoPE, and before Qwen3's q/k norms); width 1024; no
                   biases; activation = the base model's hidden_act (SiLU for every family we support); the output
                   is the raw linear value (no squashing);
    ours           weights initialised normal(0, 0.02) (the usual HF initializer_range); the heads live at
                   `model.layers.{i}.self_attn.retaining_head.{fc1,fc2}.weight` (released: `self_attn.fc1/fc2`).

No modeling code is copied. Forward hooks on each layer's `q_proj`, `k_proj`, `v_proj` (Phi-3: the fused
`qkv_proj`) collect the projections as the stock attention computes them; once a layer has all of them, the head
runs if anyone needs its output: a `BoundedCache` whose policy needs "locret_score" (the scores of the pass's new
tokens are staged with the cache, (B, q, H_kv)), or a `ScoreRecorder` (training, inspection). Otherwise nothing
runs, so the hooks cost nothing for other policies.

Checkpoints: `save_retaining_heads(model, dir)` writes locret_heads.safetensors + locret_config.json;
`trimkv.load_pretrained(dir)` (and `trimkv.load_gates(model, dir)`) recognise the directory and attach the heads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trimkv.cache import BoundedCache
from trimkv.checkpoint import ModuleFormat
from trimkv.gates import AttentionRecorder, attached, decoder_layers, num_kv_heads
from trimkv.hooks import _CACHE_ATTR, prepare  # _CACHE_ATTR: the cache of the attention forward in progress

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
SCORE = "locret_score"  # the per-token signal the policy needs and the hooks stage
CONFIG_FILE = "locret_config.json"
HEADS_FILE = "locret_heads.safetensors"
HEAD_KEY = "model.layers.{i}.self_attn.retaining_head.{name}"
FORMAT_VERSION = 1
RECORDER_ATTR = "_trimkv_locret_recorder"  # on an attention module while a ScoreRecorder is active
_PARTS_ATTR = "_trimkv_locret_parts"  # the projections of the running forward, index -> (B, q, n)
_HOOKS_ATTR = "_trimkv_locret_hooks"


@dataclass
class LocretConfig:
    """Hyperparameters of the retaining heads.

    intermediate_size: hidden width of the head MLP (released code: 1024).
    activation: nonlinearity between the two linear layers (released code: the base model's hidden_act, SiLU
        for Llama / Phi-3 / Qwen / Mistral).
    init_std: std of the normal init of both weight matrices (ours: the usual HF initializer_range).
    """

    intermediate_size: int = 1024
    activation: str = "silu"
    init_std: float = 0.02

    def __post_init__(self):
        if self.intermediate_size <= 0:
            raise ValueError(f"LocretConfig.intermediate_size must be > 0, got {self.intermediate_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LocretConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class RetainingHead(nn.Module):
    """[q; k; v] (B, T, (H_q + 2 H_kv) D) -> predicted causal importance (B, T, H_kv), float32."""

    def __init__(self, input_size: int, num_kv_heads: int, config: LocretConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(input_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, num_kv_heads, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc1.weight, std=self.config.init_std)
        nn.init.normal_(self.fc2.weight, std=self.config.init_std)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.config.activation](self.fc1(qkv.to(self.fc1.weight.dtype)))
        return self.fc2(h).float()


def projections(attn: nn.Module) -> list[nn.Module]:
    """The modules whose outputs, concatenated, are the layer's [Q; K; V] before RoPE."""
    if all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj")):
        return [attn.q_proj, attn.k_proj, attn.v_proj]
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, already in [Q; K; V] order
        return [attn.qkv_proj]
    raise ValueError(f"trimkv: unsupported attention {type(attn).__name__}: no q_proj/k_proj/v_proj or qkv_proj")


def attach_retaining_heads(model: nn.Module, config: LocretConfig | None = None) -> nn.Module:
    """Add a fresh retaining head to every decoder layer of `model`, in place, and return the model.

    The heads live at `model.model.layers[i].self_attn.retaining_head`, in the dtype and on the device of that
    layer's projections. The projection hooks are installed once, and trimkv's cache hooks too (`trimkv.prepare`).
    Attaching twice replaces the heads. A model may carry retention gates as well; each policy uses what it needs.
    """
    config = config or LocretConfig()
    layers = decoder_layers(model)
    heads = num_kv_heads(model.config)
    for layer in layers:
        attn = layer.self_attn
        modules = projections(attn)
        size = sum(m.out_features for m in modules)
        ref = modules[0].weight
        attn.retaining_head = RetainingHead(size, heads, config).to(device=ref.device, dtype=ref.dtype)
    model.trimkv_locret_config = config
    if not getattr(model, _HOOKS_ATTR, None):
        handles = []
        for layer in layers:
            attn = layer.self_attn
            modules = projections(attn)
            handles.append(attn.register_forward_pre_hook(_start_forward))
            for index, module in enumerate(modules):
                handles.append(module.register_forward_hook(partial(_on_projection, attn, index, len(modules))))
        setattr(model, _HOOKS_ATTR, handles)
    prepare(model)
    return model


def _start_forward(attn: nn.Module, args) -> None:
    setattr(attn, _PARTS_ATTR, {})  # a forward that raised midway leaves nothing behind for the next one


def _on_projection(attn: nn.Module, index: int, total: int, module: nn.Module, args, output: torch.Tensor) -> None:
    cache = getattr(attn, _CACHE_ATTR, None)
    stage = isinstance(cache, BoundedCache) and SCORE in cache.policy.needs
    recorder = getattr(attn, RECORDER_ATTR, None)
    if not (stage or recorder is not None):
        return
    parts = attn.__dict__.setdefault(_PARTS_ATTR, {})
    parts[index] = output
    if len(parts) < total:
        return
    setattr(attn, _PARTS_ATTR, {})
    score = attn.retaining_head(torch.cat([parts[i] for i in range(total)], dim=-1))  # (B, q, H_kv)
    if stage:
        cache.stage(attn.layer_idx, SCORE, score)
    if recorder is not None:
        recorder.predictions.append(score)


class ScoreRecorder(AttentionRecorder):
    """Inside `with ScoreRecorder(model) as r:`, every forward appends each layer's head output (B, T, H_kv) to
    r.predictions in layer order (with autograd history when grad is enabled). The attention implementation of
    train/locret_loss.py appends each layer's causal importance targets to r.targets."""

    attr = RECORDER_ATTR

    def __init__(self, model: nn.Module):
        retaining_heads(model)  # a clear error when there are none
        super().__init__(model)
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []


@torch.no_grad()
def predict(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The heads' predicted importance of every token: one (B, T, H_kv) float32 tensor per layer."""
    with ScoreRecorder(model) as recorder:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return recorder.predictions


def retaining_heads(model: nn.Module) -> list[RetainingHead]:
    """The attached heads, one per layer; a clear error if the model has none."""
    return attached(model, "retaining_head", "LocRet retaining heads; call trimkv.attach_retaining_heads(model) or "
                    "load a LocRet checkpoint first")


def head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Head tensors keyed by their full parameter name in the model (the checkpoint keys)."""
    return {name: p for name, p in model.named_parameters() if ".retaining_head." in name}


# ---- checkpoints: locret_heads.safetensors + locret_config.json, read through trimkv.checkpoint -------------

def save_retaining_heads(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
                         revision: str | None = None, extra: dict | None = None) -> Path:
    """Write the model's heads to `path/locret_heads.safetensors` + `path/locret_config.json`, with the contract
    of `trimkv.save_gates` (see `trimkv.checkpoint.ModuleFormat.save`)."""
    return FORMAT.save(model, path, {"input_size": retaining_heads(model)[0].fc1.in_features}, base_model, revision,
                       extra)


def _expected_shapes(arch: dict, config: LocretConfig) -> dict[str, tuple[int, ...]]:
    inner = config.intermediate_size
    shapes = {"fc1.weight": (inner, arch["input_size"]), "fc2.weight": (arch["num_kv_heads"], inner)}
    return {HEAD_KEY.format(i=i, name=n): s for i in range(arch["num_layers"]) for n, s in shapes.items()}


FORMAT = ModuleFormat("locret", CONFIG_FILE, HEADS_FILE, "locret_config", LocretConfig, ("input_size",),
                      _expected_shapes, attach_retaining_heads, head_parameters)
