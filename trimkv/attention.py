"""Retention-gated attention, the training path of TRIM-KV (arXiv 2512.03324).

Query t attends to key i <= t with the logit

    s_ti = scaling * q_t . k_i + (t - i) * log_beta_i,      log_beta_i <= 0,

so each softmax weight is multiplied by beta_i^(t - i): an ALiBi-like bias with one learned slope
per key token and KV head. GQA: query head h reads KV head h // G, G = Hq // Hkv (as `repeat_kv`).
Inference uses plain attention; beta only ranks tokens for eviction (see `trimkv.cache`).

Backends: `reference` (plain PyTorch, any device), `flex` (`flex_attention`, compiled on CUDA) and
`triton` (our fused kernel, `trimkv.kernels.retention_attention`, CUDA; needs the triton package).
`register()` adds them to transformers as `trimkv_reference` / `trimkv_flex` / `trimkv_triton`, each
with the sdpa mask builder so the model hands us a bool 4D mask (True = attend) or None.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

LOG_BETA_KWARG = "retention_log_beta"
RETENTION_IMPLEMENTATIONS = ("trimkv_reference", "trimkv_flex", "trimkv_triton")  # attn_implementation names


def retention_attention_reference(
    query: Tensor,  # (B, Hq, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    log_beta: Tensor,  # (B, Hkv, S), <= 0
    scaling: float | None = None,
    attention_mask: Tensor | None = None,  # (B, 1 or Hq, T, S): bool True = attend, or float additive
    query_positions: Tensor | None = None,  # (T,) or (B, T); default S - T .. S - 1
    key_positions: Tensor | None = None,  # (S,) or (B, S); default 0 .. S - 1
) -> Tensor:  # (B, Hq, T, D), query's dtype
    """softmax_i(scaling * q_t.k_i + (pos_t - pos_i) * log_beta_i) over keys with pos_i <= pos_t.

    Logits and softmax in fp32 (fp64 for fp64 inputs). A query row with no allowed key outputs
    zeros (not NaN), so left padding cannot poison gradients.
    """
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if log_beta.shape != (B, Hkv, S):
        raise ValueError(f"log_beta must have shape {(B, Hkv, S)}, got {tuple(log_beta.shape)}")
    scaling = D**-0.5 if scaling is None else scaling
    device = query.device
    if query_positions is None:
        query_positions = torch.arange(S - T, S, device=device)
    if key_positions is None:
        key_positions = torch.arange(S, device=device)
    # (B or 1, 1, T, 1) - (B or 1, 1, 1, S) -> distance t - i, (B or 1, 1, T, S)
    distance = query_positions.view(-1, 1, T, 1) - key_positions.view(-1, 1, 1, S)
    allowed = distance >= 0

    G, acc = Hq // Hkv, torch.promote_types(query.dtype, torch.float32)
    q = query.to(acc).view(B, Hkv, G, T, D)  # query head h = kv_head * G + g, as repeat_kv
    logits = scaling * q @ key.to(acc).unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, T, S)
    logits = logits + distance.to(acc).unsqueeze(2) * log_beta.to(acc).view(B, Hkv, 1, 1, S)
    logits = logits.view(B, Hq, T, S)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask
    elif attention_mask is not None:  # HF additive float mask: 0 = attend, dtype-min = masked
        logits = logits + attention_mask.to(acc)
    allowed = allowed.expand(B, Hq, T, S)
    # Fill with a finite minimum, then zero masked weights: fully masked rows give 0, not NaN.
    probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(acc).min), dim=-1)
    probs = (probs * allowed).view(B, Hkv, G, T, S)
    out = probs @ value.to(acc).unsqueeze(2)  # (B, Hkv, G, T, D)
    return out.view(B, Hq, T, D).to(query.dtype)


_compiled_flex_attention: Callable | None = None


def _flex_attention_fn(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA (fused kernel); eager on CPU, where it runs unfused and
    compiling costs ~25 s per shape for no gain at test sizes."""
    global _compiled_flex_attention
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def retention_attention_flex(
    query: Tensor,  # (B, Hq, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    log_beta: Tensor,  # (B, Hkv, S), <= 0
    scaling: float | None = None,
    attention_mask: Tensor | None = None,  # (B, 1 or Hq, T, S): bool True = attend, or float additive
) -> Tensor:  # (B, Hq, T, D)
    """Same formula as `retention_attention_reference`, via `flex_attention`: the score_mod adds
    (t - i) * log_beta[b, h // G, i]; causality (query t at position S - T + t) and a bool
    attention_mask go into the block mask. Rows with no allowed key output zeros."""
    B, Hq, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G, offset = Hq // Hkv, S - T
    log_beta = log_beta.float()
    float_mask = None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        float_mask, attention_mask = attention_mask.float(), None

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score + (q_idx + offset - kv_idx) * log_beta[b, h // G, kv_idx]
        if float_mask is not None:
            score = score + float_mask[b, h if float_mask.shape[1] > 1 else 0, q_idx, kv_idx]
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx + offset >= kv_idx
        if attention_mask is None:
            return causal
        return causal & attention_mask[b, h if attention_mask.shape[1] > 1 else 0, q_idx, kv_idx]

    mask_B = None if attention_mask is None else B
    mask_H = None if attention_mask is None or attention_mask.shape[1] == 1 else Hq
    block_mask = create_block_mask(mask_mod, mask_B, mask_H, T, S, device=query.device)
    flex = _flex_attention_fn(query.device)
    return flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True)


def retention_attention_triton(query: Tensor, key: Tensor, value: Tensor, log_beta: Tensor,
                               scaling: float | None = None, attention_mask: Tensor | None = None) -> Tensor:
    """Same formula, by the fused Triton kernel (imported on first use, so triton stays optional)."""
    from trimkv.kernels.retention_attention import retention_attention_triton as kernel

    return kernel(query, key, value, log_beta, scaling=scaling, attention_mask=attention_mask)


BACKENDS: dict[str, Callable[..., Tensor]] = {
    "reference": retention_attention_reference,
    "flex": retention_attention_flex,
    "triton": retention_attention_triton,
}


def retention_attention(
    query: Tensor,  # (B, Hq, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    log_beta: Tensor,  # (B, Hkv, S)
    scaling: float | None = None,
    attention_mask: Tensor | None = None,  # (B, 1 or Hq, T, S)
    backend: str = "reference",
) -> Tensor:  # (B, Hq, T, D)
    """Retention-gated attention by backend name (see `BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown retention attention backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](query, key, value, log_beta, scaling=scaling, attention_mask=attention_mask)


def retention_attention_forward(
    module: torch.nn.Module,
    query: Tensor,  # (B, Hq, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    attention_mask: Tensor | None,  # (B, 1, T, S) bool from sdpa_mask, float additive, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: str = "reference",
    **kwargs,
) -> tuple[Tensor, None]:  # (B, T, Hq, D), no attention weights
    """transformers attention-interface function (same contract as `sdpa_attention_forward`).

    Reads `kwargs["retention_log_beta"]`, shape (B, S, Hkv), put there by the retention gates.
    """
    log_beta = kwargs.get(LOG_BETA_KWARG)
    if log_beta is None:
        raise ValueError(
            f"retention attention needs kwargs[{LOG_BETA_KWARG!r}] but got none: attach the retention "
            "gates first (trimkv.attach_gates(model, ...))"
        )
    if dropout > 0:
        raise ValueError(f"retention attention does not support attention dropout (got {dropout}); set it to 0")
    log_beta = log_beta.transpose(1, 2)  # (B, S, Hkv) -> (B, Hkv, S)
    if log_beta.shape[-1] != key.shape[2]:
        raise ValueError(
            f"retention_log_beta covers {log_beta.shape[-1]} tokens but attention sees {key.shape[2]} keys; "
            "retention-gated attention is for training (whole sequence, no cache)"
        )
    out = retention_attention(query, key, value, log_beta, scaling, attention_mask, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `trimkv_reference`, `trimkv_flex`, `trimkv_triton` with transformers' attention and mask interfaces.
    Adds new names only; nothing existing is patched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for backend in BACKENDS:
        name = f"trimkv_{backend}"
        AttentionInterface.register(name, partial(retention_attention_forward, backend=backend))
        AttentionMaskInterface.register(name, sdpa_mask)


register()
