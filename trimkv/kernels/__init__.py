"""Triton kernels for gate training and decoding (optional: needs the `triton` package, which the CUDA builds of
torch bring).

    retention_attention   retention-gated attention, forward and backward (`trimkv.attention` backend "triton")
    capacity              the capacity sums S_t = sum_{i<=t} beta_i^(t-i) and their gradient (`trimkv.train.losses`)
    decode_attention      a decode step's attention over the bounded cache's slots, split over the slots
                          (`trimkv.hooks.sdpa_forward` on a GPU)
    decode_linear         a decode step's linear layers (at most 16 rows), split over the inner dimension
                          (`trimkv.decode.StaticDecoder`, on by default)

Importing this package needs nothing; importing its modules needs triton. `available()` says whether the kernels
can run here: triton importable and a CUDA device (or Triton's CPU interpreter, TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import os


def available() -> bool:
    """True when the Triton kernels can run: triton imports and there is a GPU (or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
