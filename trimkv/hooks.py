"""The hooks that connect a stock transformers model to trimkv, with no modeling code copied.

- on the decoder (`model.model`), before each forward: hand a `BoundedCache` the 2-D padding mask and
  replace it by the 4-D mask that describes the cache's compacted slots (transformers passes a 4-D
  mask through unchanged); after the forward: let the cache compress;
- on each layer's `self_attn`, before its forward: run the retention gate on the layer's normed input
  (the attention module's `hidden_states`) and hand log beta to the cache, and to retention-gated
  attention when the model runs with `attn_implementation="trimkv_*"` (training).
"""

from __future__ import annotations

import torch
from torch import nn

from trimkv.cache import BoundedCache
from trimkv.compat import cache_from_kwargs
from trimkv.gates import decoder_layers

MASK_FORMATS = {"sdpa": "bool", "eager": "float"}  # attention implementations the bounded cache serves
_HOOKED = "_trimkv_hooks"


def _mask_format(config) -> str:
    impl = config._attn_implementation or "eager"
    if impl.startswith("trimkv_"):
        return "bool"
    if impl not in MASK_FORMATS:
        raise ValueError(
            f"the bounded cache supports attn_implementation in {sorted(MASK_FORMATS)}, got {impl!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    return MASK_FORMATS[impl]


def _decoder_pre_hook(module: nn.Module, args, kwargs):
    cache = cache_from_kwargs(kwargs)
    if not isinstance(cache, BoundedCache):
        return None
    tokens = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    shape = tokens.shape if tokens is not None else embeds.shape[:2]
    device = (tokens if tokens is not None else embeds).device
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        raise ValueError("BoundedCache cannot use masks prepared by generate for a compiled cache")
    kwargs["attention_mask"] = cache.begin_forward(
        mask, shape[0], shape[1], device, _mask_format(module.config), module.dtype
    )
    return args, kwargs


def _decoder_post_hook(module: nn.Module, args, kwargs, output):
    cache = cache_from_kwargs(kwargs)
    if isinstance(cache, BoundedCache):
        cache.end_forward()
    return None


def _attention_pre_hook(module: nn.Module, args, kwargs):
    gate = getattr(module, "retention_gate", None)
    if gate is None:
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = cache_from_kwargs(kwargs)
    wants_cache = isinstance(cache, BoundedCache) and "log_beta" in cache.policy.needs
    wants_attention = (module.config._attn_implementation or "").startswith("trimkv_")
    if not (wants_cache or wants_attention):
        return None
    log_beta = gate(hidden)  # (B, T, H_kv)
    if wants_cache:
        cache.stage(module.layer_idx, "log_beta", log_beta)
    if wants_attention:
        kwargs["retention_log_beta"] = log_beta
    return args, kwargs


def prepare(model: nn.Module) -> nn.Module:
    """Install trimkv's hooks on `model` (idempotent) so it can drive a `BoundedCache`; returns the model.

    `attach_gates` and `load_pretrained` call this; call it yourself to run a baseline policy on a
    base model without gates.
    """
    layers = decoder_layers(model)
    if getattr(model, _HOOKED, None):
        return model
    handles = [
        model.model.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True),
        model.model.register_forward_hook(_decoder_post_hook, with_kwargs=True, always_call=True),
    ]
    handles += [layer.self_attn.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True) for layer in layers]
    setattr(model, _HOOKED, handles)
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the hooks `prepare` installed."""
    for handle in getattr(model, _HOOKED, None) or []:
        handle.remove()
    setattr(model, _HOOKED, None)
    return model


@torch.no_grad()
def retention(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """log beta of every token for every layer: a list of (B, T, H_kv) tensors, one per layer.

    Runs one plain forward and records each gate's output (for heatmaps and the brute-force tests).
    """
    from trimkv.gates import gates

    outputs: list[torch.Tensor] = []

    def record(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        outputs.append(module.retention_gate(hidden))

    gates(model)  # a clear error when there are none
    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outputs
