"""The hooks that connect a stock transformers model to trimkv, with no modeling code copied.

- on the decoder (`model.model`), before each forward: hand a `BoundedCache` the 2-D padding mask and
  replace it by the 4-D mask that describes the cache's compacted slots (transformers passes a 4-D
  mask through unchanged); a prompt longer than the cache's `prefill_chunk` is run chunk by chunk
  here first. After the forward: close the cache's bookkeeping for the pass;
- on each layer's `self_attn`, before its forward: run the retention gate on the layer's normed input
  (the attention module's `hidden_states`) and hand log beta to the cache, and to retention-gated
  attention when the model runs with a `trimkv_reference` / `trimkv_flex` implementation (training);
  after its forward: let the cache evict for that layer;
- the attention function itself: `prepare` switches `sdpa` / `eager` to `trimkv_sdpa` /
  `trimkv_eager`, the same functions with the same masks, which also show the layer's queries to the
  cache (attention-based policies score with them) and let it narrow the mask for a policy that reads
  only part of the cache (seerattn_r). Without a bounded cache they change nothing. A flash-attn
  implementation (`flash_attention_2`, ...) becomes `trimkv_<name>`: flash-attn reads a padding mask
  and cannot describe the cache's compacted slots, so the passes over a bounded cache run `trimkv_sdpa`
  and every other pass runs flash-attn as before.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from trimkv.attention import LOG_BETA_KWARG, RETENTION_IMPLEMENTATIONS
from trimkv.cache import BoundedCache
from trimkv.compat import cache_from_kwargs
from trimkv.gates import decoder_layers

OBSERVED = {"sdpa": "trimkv_sdpa", "eager": "trimkv_eager"}  # stock implementation -> observed twin
MASK_FORMATS = {"trimkv_sdpa": "bool", "trimkv_eager": "float", **{name: "bool" for name in RETENTION_IMPLEMENTATIONS}}
_HOOKED = "_trimkv_hooks"
_CACHE_ATTR = "_trimkv_cache"  # set on an attention module for the duration of its forward


def _observed(stock):
    def attention(module, query, key, value, attention_mask, **kwargs):
        cache = getattr(module, _CACHE_ATTR, None)
        if cache is not None:
            cache.observe_queries(module.layer_idx, query, kwargs.get("scaling") or query.shape[-1] ** -0.5)
            attention_mask = cache.layer_mask(module, query, key, attention_mask)  # seerattn_r: its blocks only
        return stock(module)(module, query, key, value, attention_mask, **kwargs)

    return attention


def _model_eager(module):  # every modeling file has its own eager_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def _split_decode(query, mask) -> bool:
    """Whether a decode step's attention runs `trimkv.kernels.decode_attention` (a CUDA device with triton)."""
    from trimkv import kernels

    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and mask.dtype == torch.bool and kernels.available())


def sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for a one-token pass with a mask under GQA (a decode step on the
    bounded cache): transformers then repeats K and V for every query head (its SDPA path uses GQA only without
    a mask), a copy of the whole cache per layer and step. Instead the G query heads of each KV head become G
    query rows of one attention over the KV head's keys, read once: on a GPU the split-slot Triton kernel
    (`trimkv.kernels.decode_attention`), elsewhere one SDPA call."""
    B, Hq, q, D = query.shape
    Hkv = key.shape[1]
    if q != 1 or attention_mask is None or Hq == Hkv or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    G, K = Hq // Hkv, key.shape[2]
    if _split_decode(query, attention_mask):
        from trimkv.kernels.decode_attention import decode_attention

        out = decode_attention(query, key, value, attention_mask.expand(B, -1, 1, K), scaling or D**-0.5)
        return out.reshape(B, 1, Hq, D), None
    if attention_mask.shape[1] == Hq:  # a per-head mask (B, Hq, 1, K) -> (B, Hkv, G, K)
        attention_mask = attention_mask.reshape(B, Hkv, G, K)
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(B, Hkv, G, D), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, 1, Hq, out.shape[-1]), None  # (B, q, Hq, D) as transformers returns it


_observed_sdpa = _observed(lambda module: sdpa_forward)
AttentionInterface.register("trimkv_sdpa", _observed_sdpa)
AttentionInterface.register("trimkv_eager", _observed(_model_eager))
AttentionMaskInterface.register("trimkv_sdpa", sdpa_mask)
AttentionMaskInterface.register("trimkv_eager", eager_mask)


def _twin(impl: str) -> str | None:
    """The implementation `prepare` switches `impl` to (registering a flash-attn twin on first use), or None."""
    if impl in OBSERVED:
        return OBSERVED[impl]
    if not impl or "flash" not in impl or impl not in ALL_ATTENTION_FUNCTIONS:
        return None
    twin = f"trimkv_{impl}"
    if twin not in MASK_FORMATS:
        def attention(module, query, key, value, attention_mask, **kwargs):
            if getattr(module, _CACHE_ATTR, None) is not None:
                return _observed_sdpa(module, query, key, value, attention_mask, **kwargs)
            return ALL_ATTENTION_FUNCTIONS[impl](module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(twin, attention)
        AttentionMaskInterface.register(twin, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # its padding mask, off the cache
        MASK_FORMATS[twin] = "bool"  # what the cache builds for trimkv_sdpa
    return twin


def _mask_format(config) -> str:
    impl = config._attn_implementation
    if impl not in MASK_FORMATS:
        raise ValueError(
            f"the bounded cache supports attn_implementation 'sdpa', 'eager' or flash-attn's, got {impl!r}; "
            "load the model with one of them and call trimkv.prepare(model)"
        )
    return MASK_FORMATS[impl]


_PER_TOKEN_KWARGS = ("position_ids", "cache_position")


def _slice_kwargs(kwargs: dict, start: int, stop: int, q_len: int) -> dict:
    """The forward kwargs of tokens [start, stop) of a pass of q_len new tokens."""
    out = dict(kwargs)
    for name in ("input_ids", "inputs_embeds"):
        if out.get(name) is not None:
            out[name] = out[name][:, start:stop]
    for name in _PER_TOKEN_KWARGS:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == q_len:
            out[name] = value[..., start:stop]
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        out["attention_mask"] = mask[:, : mask.shape[1] - q_len + stop]
    return out


def _decoder_pre_hook(module: nn.Module, args, kwargs):
    cache = cache_from_kwargs(kwargs)
    if not isinstance(cache, BoundedCache):
        return None
    if args:  # normalise a positional input_ids so the kwargs can be sliced
        kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
    tokens, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch, q_len = (tokens if tokens is not None else embeds).shape[:2]
    chunk = cache.prefill_chunk
    if chunk and q_len > chunk:
        # Chunked prefill: all but the last chunk run now (each a full pass with its own eviction),
        # the last one continues as this forward.
        last = (q_len - 1) // chunk * chunk
        for start in range(0, last, chunk):
            module(*args, **_slice_kwargs(kwargs, start, start + chunk, q_len))
        kwargs, q_len = _slice_kwargs(kwargs, last, q_len, q_len), q_len - last
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        raise ValueError(  # noqa: TRY004 (the caller's setup, not an argument's type)
            "BoundedCache cannot use masks prepared by generate for a compiled cache")
    device = (tokens if tokens is not None else embeds).device
    kwargs["attention_mask"] = cache.begin_forward(mask, batch, q_len, device, _mask_format(module.config),
                                                   module.dtype)
    return args, kwargs


def _decoder_post_hook(module: nn.Module, args, kwargs, output):
    cache = cache_from_kwargs(kwargs)
    if isinstance(cache, BoundedCache):
        cache.end_forward()


def _attention_pre_hook(module: nn.Module, args, kwargs):
    cache = cache_from_kwargs(kwargs)
    bounded = isinstance(cache, BoundedCache)
    setattr(module, _CACHE_ATTR, cache if bounded else None)
    gate = getattr(module, "retention_gate", None)
    wants_cache = bounded and "log_beta" in cache.policy.needs
    wants_attention = module.config._attn_implementation in RETENTION_IMPLEMENTATIONS
    if gate is None or not (wants_cache or wants_attention):
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    log_beta = gate(hidden)  # (B, T, H_kv)
    if wants_cache:
        cache.stage(module.layer_idx, "log_beta", log_beta)
    if wants_attention:
        kwargs[LOG_BETA_KWARG] = log_beta
    return args, kwargs


def _attention_post_hook(module: nn.Module, args, kwargs, output):
    cache = getattr(module, _CACHE_ATTR, None)
    if cache is not None:
        setattr(module, _CACHE_ATTR, None)
        cache.after_attention(module.layer_idx)


def prepare(model: nn.Module) -> nn.Module:
    """Install trimkv's hooks on `model` (idempotent) so it can drive a `BoundedCache`; returns the model.

    Switches `attn_implementation` sdpa/eager to its observed twin (same outputs), and flash-attn's to a twin
    that runs the passes over a bounded cache through SDPA. `attach_gates` and `load_pretrained` call this;
    call it yourself to run a baseline policy on a model without gates.
    """
    layers = decoder_layers(model)
    if getattr(model, _HOOKED, None):
        return model
    impl = model.config._attn_implementation
    twin = _twin(impl)
    if twin is not None:
        model.config._attn_implementation = twin
    handles = [
        model.model.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True),
        model.model.register_forward_hook(_decoder_post_hook, with_kwargs=True, always_call=True),
    ]
    for layer in layers:
        handles.append(layer.self_attn.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(_attention_post_hook, with_kwargs=True))
    setattr(model, _HOOKED, (handles, impl, twin))
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Remove the hooks `prepare` installed and restore the attention implementation."""
    hooked = getattr(model, _HOOKED, None)
    if hooked:
        handles, impl, twin = hooked
        for handle in handles:
            handle.remove()
        if twin is not None and model.config._attn_implementation == twin:
            model.config._attn_implementation = impl
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
