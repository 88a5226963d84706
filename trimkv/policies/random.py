"""Random eviction: the floor every learned or heuristic policy must beat.

Each token gets an i.i.d. uniform score in [0, 1) and the top-M are kept. The score is a fixed
function of (seed, layer, KV head, original position), computed by an integer hash in torch:

    score_i = hash32(seed, layer, head, position_i) / 2^32        (24 significant bits, exact in float32)

so it needs no generator state and no Python loop, and it is batch-independent: a row of a padded
batch keeps exactly what it keeps alone, since padding changes neither positions nor heads. Because
a token's score never changes, keeping the top-M of all tokens seen is a uniformly random M-subset
of them (priority sampling), plus the recent tokens that sit in the buffer between compressions.

Every (layer, head) draws independently, as a per-layer random eviction would. Known limit: the
choice depends on positions, not content, so every sequence with a given seed sees the same
pattern. Change `seed` for another draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy

_MASK = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2^31: a 32-bit value times it stays inside int64, no overflow
_STEP = 0x9E3779B9  # golden-ratio increment: moves 0 off the mixer's fixed point


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32)."""
    x = (x + _STEP) & _MASK
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK
    return x ^ (x >> 16)


@dataclass
class Random(Policy):
    name = "random"

    seed: int = 0

    def score(self, view: CacheView) -> torch.Tensor:
        positions = view.positions  # (B, H, N) long
        device = positions.device
        H = positions.shape[1]
        x = _mix(torch.tensor(self.seed % 2**32, dtype=torch.long, device=device))
        x = _mix(x ^ view.layer)
        x = _mix(x ^ torch.arange(H, device=device).view(1, H, 1))  # (1, H, 1)
        x = _mix(x ^ (positions & _MASK))  # (B, H, N)
        return (x >> 8).float() / 2**24
