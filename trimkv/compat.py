"""Every transformers-version branch in one place (supported: 5.17 through the newest 5.x).

- The cache keyword of model/layer/attention forwards: `past_key_values` until 5.2x, `cache` after
  (the old name is still accepted with a deprecation warning for a while).
- Gradient checkpointing: `gradient_checkpointing_enable` until 5.2x, `activation_checkpointing_enable`
  after (the old name warns).
"""

from __future__ import annotations

from typing import Any

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_from_kwargs(kwargs: dict[str, Any]):
    """The Cache object a forward was called with, whatever the keyword of this transformers version."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def generate_cache_kwarg(model) -> str:
    """The keyword `model.generate` takes a Cache under in this transformers version."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, whatever this version calls it."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
