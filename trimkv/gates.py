"""Retention gates: one small MLP per decoder layer that predicts how long each token is worth keeping.

For token i with the layer's normed input hidden state h_i, the gate outputs, per KV head,

    log beta_i = logsigmoid(W2 silu(W1 h_i + b1) + b)        W1: d -> 512, W2: 512 -> n_kv_heads

beta_i in (0, 1) is the token's retention: its weight for a query t steps later decays as beta_i^(t - i).
Training multiplies attention weights by that decay; inference uses it only to choose what to evict.

Gates attach to any Hugging Face decoder LM in place (`attach_gates`) as `layer.self_attn.retention_gate`,
which gives the same parameter names as the released upstream checkpoints
(`model.layers.{i}.self_attn.retention_gate.{linear1.weight,linear1.bias,linear2.weight,bias}`).
No modeling code is copied: a forward pre-hook on each attention module computes the gate (see hooks.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass
class GateConfig:
    """Hyperparameters of the retention gates.

    intermediate_size: hidden width of the gate MLP (512 in the paper and the released checkpoints).
    bias_init: initial per-head bias b; beta = sigmoid(b) ~ 1 at init, so a fresh gate evicts nothing
        useful and the gated model equals the base model (upstream code default 10.0; the released
        Qwen3-4B-Math checkpoint uses 8.0; the paper reports 18).
    activation: nonlinearity between the two linear layers.
    init_std: std of the normal init of both weight matrices (the usual HF initializer_range).
    """

    intermediate_size: int = 512
    bias_init: float = 10.0
    activation: str = "silu"
    init_std: float = 0.02

    def __post_init__(self):
        if self.intermediate_size <= 0:
            raise ValueError(f"GateConfig.intermediate_size must be > 0, got {self.intermediate_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GateConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class RetentionGate(nn.Module):
    """hidden (B, T, d) -> log beta (B, T, n_kv_heads), computed in float32 for a stable logsigmoid."""

    def __init__(self, hidden_size: int, num_kv_heads: int, config: GateConfig):
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(hidden_size, config.intermediate_size, bias=True)
        self.linear2 = nn.Linear(config.intermediate_size, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.empty(num_kv_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.linear1.weight, std=self.config.init_std)
        nn.init.zeros_(self.linear1.bias)
        nn.init.normal_(self.linear2.weight, std=self.config.init_std)
        nn.init.constant_(self.bias, self.config.bias_init)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.config.activation](self.linear1(hidden))
        logits = self.linear2(h).float() + self.bias.float()  # (B, T, n_kv)
        return F.logsigmoid(logits)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM, each with a `self_attn` that carries `layer_idx`.

    Works for every transformers decoder that follows the `model.model.layers[i].self_attn` layout
    (Qwen2/3, Llama, Mistral, Phi-3, ...). Anything else gets an error naming what was missing.
    """
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None) if base is not None else None
    name = type(model).__name__
    if layers is None:
        raise ValueError(f"trimkv: unsupported model {name}: no decoder layers at `model.model.layers`")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"trimkv: unsupported model {name}: layer {i} has no `self_attn` module")
        if getattr(attn, "layer_idx", None) != i:
            raise ValueError(f"trimkv: unsupported model {name}: layer {i}'s self_attn has no matching `layer_idx`")
    if not hasattr(layers[0], "input_layernorm"):
        raise ValueError(f"trimkv: unsupported model {name}: decoder layers have no `input_layernorm`")
    return list(layers)


def attached(model: nn.Module, attr: str, missing: str) -> list[nn.Module]:
    """Every layer's `self_attn.<attr>` (retention_gate, retaining_head, attn_gate), in layer order; a ValueError
    "trimkv: the model has no <missing>" if a layer has none."""
    found = [getattr(layer.self_attn, attr, None) for layer in decoder_layers(model)]
    if any(m is None for m in found):
        raise ValueError(f"trimkv: the model has no {missing}")
    return found


class AttentionRecorder:
    """`with Recorder(model) as r:` puts r on every layer's attention module as the attribute `attr` (set by the
    subclass), so the attention implementation a training objective runs can hand r what it computes."""

    attr: str

    def __init__(self, model: nn.Module):
        self.modules = [layer.self_attn for layer in decoder_layers(model)]

    def __enter__(self):
        for attn in self.modules:
            setattr(attn, self.attr, self)
        return self

    def __exit__(self, *exc) -> None:
        for attn in self.modules:
            setattr(attn, self.attr, None)


def num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def attach_gates(model: nn.Module, config: GateConfig | None = None) -> nn.Module:
    """Add a fresh retention gate to every decoder layer of `model`, in place, and return the model.

    The gates live at `model.model.layers[i].self_attn.retention_gate`, in the dtype and on the device
    of that layer. The hooks that feed gate outputs to the bounded cache and to retention-gated
    attention are installed too (`trimkv.prepare`). Attaching twice replaces the gates.
    """
    from trimkv.hooks import prepare

    config = config or GateConfig()
    layers = decoder_layers(model)
    hidden, heads = model.config.hidden_size, num_kv_heads(model.config)
    for layer in layers:
        ref = layer.input_layernorm.weight
        layer.self_attn.retention_gate = RetentionGate(hidden, heads, config).to(device=ref.device, dtype=ref.dtype)
    model.trimkv_gate_config = config
    prepare(model)
    return model


def gates(model: nn.Module) -> list[RetentionGate]:
    """The attached gates, one per layer; a clear error if the model has none."""
    return attached(model, "retention_gate", "retention gates; call trimkv.attach_gates(model) first")


def gate_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gate tensors keyed by their full parameter name in the model (the upstream checkpoint keys)."""
    return {name: p for name, p in model.named_parameters() if ".retention_gate." in name}
