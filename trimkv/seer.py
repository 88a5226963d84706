"""SeerAttention-R's AttnGate: one small module per decoder layer that predicts, for the current query, which key
blocks attention will need.

Source: Gao et al., 2025, "SeerAttention-R: Sparse Attention Adaptation for Long Reasoning", arXiv 2506.08889, and
its released code (github.com/microsoft/SeerAttention, seer_attn/decode_sparse/). The keys of a layer are cut into
blocks of b tokens (block j = positions [j b, (j + 1) b)). For KV head h, with q_i^g the query of head g of its
group G(h) and k_t the keys, both before RoPE (after Qwen3's q/k norms):

    Q_i   = rope_i( norm( sum_{g in G(h)} W_q[h, g]^T q_i^g ) )                         (gate dim d_g)
    K_j   = rope_{j b}( norm( W_k[h]^T [max_t k_t; min_t k_t; mean_t k_t]_{t in block j} ) )
    s_ij  = Q_i . K_j / sqrt(d_g)                                       the gate's logit of block j for query i

trained (train/seer_loss.py, base model frozen) so that softmax_j(s_ij) over the blocks before the query's own
block matches the base model's block-pooled attention (KL). At decode (policies/seerattn_r.py) each (sequence,
layer, KV head) attends only to its top budget // b blocks by s_ij plus the block being written; the cache keeps
every token.

Where each choice comes from:
    paper / released code   q-head pooling by a learned per-group projection ("Qproj"); K pooled by max, min and
                            mean over the block ("Kmaxminavg"); RMSNorm on both sides and RoPE in the gate
                            (run_distillation_decode.sh defaults use_qk_norm / use_rope true); gate width 128; block
                            64; inputs are the layer's q / k before RoPE;
    ours                    projections initialised xavier-uniform (the released modules' own init, which the
                            released training model overwrites with normal(0, initializer_range) when it loads the
                            base weights); the gate's RoPE is plain RoPE over d_g dims with the base model's
                            rope_theta, the query at its position and block j at j b in training *and* decoding
                            (released decoding rotates a just-finished block at its last position); the model's RoPE
                            is undone on the cached keys (exactly: RoPE is a rotation), so no pre-RoPE copy of the
                            keys is stored, at the cost of one pass over the cached keys per decode step and layer
                            (released: an incremental cache of pooled block keys); parameters at
                            `model.layers.{i}.self_attn.attn_gate.{q_proj, k_proj, q_norm.weight, k_norm.weight}`.

No modeling code is copied: gates attach as submodules of each attention module, and the decoding selection runs
through the cache's `layer_mask` (trimkv/cache.py), the training targets through an attention implementation.

Checkpoints: `save_attn_gates(model, dir)` writes seer_gates.safetensors + seer_config.json;
`trimkv.load_pretrained(dir)` (and `trimkv.load_gates(model, dir)`) recognise the directory and attach the gates.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from trimkv.checkpoint import ModuleFormat
from trimkv.gates import attached, decoder_layers, num_kv_heads
from trimkv.hooks import prepare

POOLINGS = ("max", "min", "avg")
CONFIG_FILE = "seer_config.json"
GATES_FILE = "seer_gates.safetensors"
GATE_KEY = "model.layers.{i}.self_attn.attn_gate.{name}"
FORMAT_VERSION = 1
_ROTARY_ATTR = "_trimkv_rotary"  # the model's rotary embedding, on each attention module (not a submodule)


@dataclass
class SeerConfig:
    """Hyperparameters of the AttnGate.

    block_size: tokens per key block b (released: 64; the released kernels allow 16, 32, 64).
    gate_hidden_size: the gate's query/key width d_g (released: 128).
    pooling: how a block's keys are summarised, concatenated in this order (released: max, min, avg).
    qk_norm: RMSNorm on the gate's query and key (released training script: on).
    rope: RoPE on the gate's query (at its position) and key (at its block's first position) (released: on).
    """

    block_size: int = 64
    gate_hidden_size: int = 128
    pooling: tuple[str, ...] = POOLINGS
    qk_norm: bool = True
    rope: bool = True

    def __post_init__(self):
        self.pooling = tuple(self.pooling)
        if self.block_size <= 0 or self.gate_hidden_size <= 0 or self.gate_hidden_size % 2:
            raise ValueError(f"SeerConfig needs block_size > 0 and an even gate_hidden_size > 0, got "
                             f"{self.block_size}, {self.gate_hidden_size}")
        if not self.pooling or any(p not in POOLINGS for p in self.pooling):
            raise ValueError(f"SeerConfig.pooling must be a non-empty subset of {POOLINGS}, got {self.pooling}")

    def to_dict(self) -> dict:
        return {**asdict(self), "pooling": list(self.pooling)}


class AttnGate(nn.Module):
    """Block logits s (B, H_kv, T, n_blocks) from queries and keys before RoPE. See the module docstring."""

    def __init__(self, head_dim: int, num_q_heads: int, num_kv_heads: int, config: SeerConfig,
                 rope_theta: float = 10000.0):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"AttnGate: {num_q_heads} query heads do not group over {num_kv_heads} KV heads")
        self.config = config
        self.group = num_q_heads // num_kv_heads
        h = config.gate_hidden_size
        self.q_proj = nn.Parameter(torch.empty(num_kv_heads, self.group, head_dim, h))  # (H_kv, G, D, d_g)
        self.k_proj = nn.Parameter(torch.empty(num_kv_heads, len(config.pooling) * head_dim, h))  # (H_kv, P D, d_g)
        self.q_norm = nn.RMSNorm(h, eps=1e-6) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(h, eps=1e-6) if config.qk_norm else None
        self.register_buffer("inv_freq", rope_theta ** -(torch.arange(0, h, 2, dtype=torch.float32) / h),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_proj, self.k_proj):  # xavier-uniform over (in, out) of each head's matrix
            bound = math.sqrt(6.0 / (w.shape[-2] + w.shape[-1]))
            nn.init.uniform_(w, -bound, bound)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, d_g) rotated at positions (B, N) or (N,)."""
        if not self.config.rope:
            return x
        angles = positions.float()[..., None] * self.inv_freq  # (..., N, d_g / 2)
        cos, sin = angles.cos(), angles.sin()
        if cos.dim() == 3:  # per row
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def query(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q (B, H_q, T, D) before RoPE at positions (B, T) -> the gate's queries (B, H_kv, T, d_g)."""
        B, Hq, T, D = q.shape
        q = q.to(self.q_proj.dtype).view(B, Hq // self.group, self.group, T, D)
        out = torch.einsum("bkgtd,kgdo->bkto", q, self.q_proj)
        if self.q_norm is not None:
            out = self.q_norm(out)
        return self._rope(out, positions)

    def keys(self, k: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """k (B, H_kv, N, D) before RoPE, N >= n_blocks * b -> the gate's keys of the first n_blocks complete blocks
        (B, H_kv, n_blocks, d_g)."""
        B, H, _, D = k.shape
        b = self.config.block_size
        blocks = k[:, :, : n_blocks * b].to(self.k_proj.dtype).reshape(B, H, n_blocks, b, D)
        pooled = {"max": lambda: blocks.amax(3), "min": lambda: blocks.amin(3), "avg": lambda: blocks.mean(3)}
        x = torch.cat([pooled[p]() for p in self.config.pooling], dim=-1)  # (B, H, n, P D)
        out = torch.einsum("bhni,hio->bhno", x, self.k_proj)
        if self.k_norm is not None:
            out = self.k_norm(out)
        return self._rope(out, torch.arange(n_blocks, device=k.device) * b)

    def logits(self, q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """s (B, H_kv, T, n_blocks) float32: query i against block j, no masking."""
        s = self.query(q, q_positions) @ self.keys(k, n_blocks).transpose(-1, -2)
        return s.float() / math.sqrt(self.config.gate_hidden_size)


# ---- the model's RoPE, undone -----------------------------------------------------------------------------------

def unrotate(module: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) after the model's RoPE at positions (B, N) -> before it, float32.

    The model rotates each pair (x_i, x_{i + r/2}) of its first r dims by (c, s) = (cos, sin) * scale; the inverse
    is (c x - s J x) / (c^2 + s^2), J = rotate_half. Exact for default, scaled (yarn, longrope) and partial RoPE.
    """
    rotary = module.__dict__.get(_ROTARY_ATTR)
    if rotary is None:
        raise ValueError("trimkv: this attention module has no rotary embedding recorded; attach the SeerAttention-R "
                         "gates with trimkv.attach_attn_gates (or load a seerattn_r checkpoint)")
    cos, sin = rotary(x.new_zeros((), dtype=torch.float32), positions.clamp(min=0))
    cos, sin = cos.float()[:, None], sin.float()[:, None]  # (B, 1, N, r)
    r = cos.shape[-1]
    x = x.float()
    xr = x[..., :r]
    x1, x2 = xr.chunk(2, dim=-1)
    j = torch.cat([-x2, x1], dim=-1)
    return torch.cat([(xr * cos - j * sin) / (cos * cos + sin * sin), x[..., r:]], dim=-1)


# ---- attach, inspect ------------------------------------------------------------------------------------------

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


def attach_attn_gates(model: nn.Module, config: SeerConfig | None = None) -> nn.Module:
    """Add a fresh AttnGate to every decoder layer of `model`, in place, and return the model.

    The gates live at `model.model.layers[i].self_attn.attn_gate`, in the dtype and on the device of that layer's
    weights; trimkv's cache hooks are installed too (`trimkv.prepare`). Attaching twice replaces the gates. A model
    may carry retention gates or LocRet heads as well; each policy uses what it needs.
    """
    config = config or SeerConfig()
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"trimkv: {type(model).__name__} has no model.rotary_emb; SeerAttention-R gates need RoPE")
    cfg = model.config
    heads, kv = cfg.num_attention_heads, num_kv_heads(cfg)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // heads
        ref = next(attn.parameters())
        attn.attn_gate = AttnGate(head_dim, heads, kv, config, _rope_theta(cfg)).to(device=ref.device, dtype=ref.dtype)
        attn.__dict__[_ROTARY_ATTR] = rotary  # shared, not registered: no second copy in state_dict / modules()
    model.trimkv_seer_config = config
    prepare(model)
    return model


def attn_gates(model: nn.Module) -> list[AttnGate]:
    """The attached gates, one per layer; a clear error if the model has none."""
    return attached(model, "attn_gate", "SeerAttention-R gates; call trimkv.attach_attn_gates(model) or load a "
                    "seerattn_r checkpoint first")


def gate_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gate tensors keyed by their full parameter name in the model (the checkpoint keys)."""
    return {name: p for name, p in model.named_parameters() if ".attn_gate." in name}


# ---- decoding: which cached keys each query reads --------------------------------------------------------------

def decode_selection(module: nn.Module, query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor,
                     budget: int) -> torch.Tensor | None:
    """Keys a one-token decode step of `module` reads: (B, H_q, 1, K) bool, or None for all of them.

    query (B, H_q, 1, D) and key (B, H_kv, K, D) after RoPE, key slot t holding position t (a cache that stores
    every token); query_positions (B,). With c = position // b the query's block and n = budget // b, each KV head
    keeps its top-n blocks j < c by the gate's logit (all of them when c <= n), and block c. None when n covers
    every block the K slots can hold (everything is read: exactly the full cache) and for passes of more than one
    token (prefill is dense, as in the released code). No value is read back to the host.
    """
    B, _, q, _ = query.shape
    gate = getattr(module, "attn_gate", None)
    if gate is None:
        raise ValueError("policy 'seerattn_r' needs SeerAttention-R gates; attach them with "
                         "trimkv.attach_attn_gates or load a seerattn_r checkpoint (python -m trimkv train "
                         "--method seerattn_r)")
    b = gate.config.block_size
    n = budget // b
    K = key.shape[2]
    n_blocks = K // b  # complete blocks the slots can hold; blocks >= the query's are masked below
    if q != 1 or n >= n_blocks:
        return None
    current = query_positions // b  # (B,)
    slots = torch.arange(K, device=key.device)
    q_nope = unrotate(module, query, query_positions[:, None])
    k_nope = unrotate(module, key[:, :, : n_blocks * b], slots[: n_blocks * b].expand(B, -1))
    s = gate.logits(q_nope, query_positions[:, None], k_nope, n_blocks)  # (B, H_kv, 1, n_blocks)
    earlier = torch.arange(n_blocks, device=key.device) < current[:, None, None, None]
    s = s.masked_fill(~earlier, -math.inf)
    top = s.topk(n, dim=-1).indices
    chosen = torch.zeros_like(earlier.expand_as(s)).scatter(-1, top, True) & earlier  # (B, H_kv, 1, n_blocks)
    block_of = (slots // b).clamp(max=max(n_blocks - 1, 0))
    keep = chosen[..., block_of] | ((slots // b)[None, None, None, :] >= current[:, None, None, None])
    return keep.repeat_interleave(gate.group, dim=1)  # (B, H_q, 1, K)


# ---- checkpoints: seer_gates.safetensors + seer_config.json, read through trimkv.checkpoint ---------------------

def save_attn_gates(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
                    revision: str | None = None, extra: dict | None = None) -> Path:
    """Write the model's AttnGates to `path/seer_gates.safetensors` + `path/seer_config.json`, with the contract of
    `trimkv.save_gates` (see `trimkv.checkpoint.ModuleFormat.save`)."""
    architecture = {"num_q_heads": model.config.num_attention_heads, "head_dim": attn_gates(model)[0].q_proj.shape[2]}
    return FORMAT.save(model, path, architecture, base_model, revision, extra)


def _expected_shapes(arch: dict, config: SeerConfig) -> dict[str, tuple[int, ...]]:
    kv, h, D = arch["num_kv_heads"], config.gate_hidden_size, arch["head_dim"]
    shapes = {"q_proj": (kv, arch["num_q_heads"] // kv, D, h), "k_proj": (kv, len(config.pooling) * D, h)}
    if config.qk_norm:
        shapes.update({"q_norm.weight": (h,), "k_norm.weight": (h,)})
    return {GATE_KEY.format(i=i, name=n): s for i in range(arch["num_layers"]) for n, s in shapes.items()}


FORMAT = ModuleFormat("seerattn_r", CONFIG_FILE, GATES_FILE, "seer_config", SeerConfig, ("num_q_heads", "head_dim"),
                      _expected_shapes, attach_attn_gates, gate_parameters)
