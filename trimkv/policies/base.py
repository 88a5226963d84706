"""What every eviction rule shares: the view of cached tokens it scores, and its base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class CacheView:
    """One layer's candidate tokens, laid out along the last token axis N.

    keys, values: (B, H_kv, N, D), keys after RoPE.
    positions:    (B, H_kv, N) original position of each token in its own sequence (padding excluded).
    extras:       per-token signals the policy asked for in `needs`, each (B, H_kv, N) float32,
                  e.g. "log_beta" from the retention gates.
    t:            (B, 1, 1) the step the scores are taken at: tokens seen + 1, as in the released code.
    valid:        (B, 1, N) bool, False for empty slots (their score is ignored).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    extras: dict[str, torch.Tensor]
    t: torch.Tensor
    valid: torch.Tensor


class Policy:
    """An eviction rule: a score per cached token, higher = keep. Selection lives in the cache.

    Subclasses are small dataclasses: `name`, the per-token signals they `need` staged by the model
    hooks, and `score(view) -> (B, H_kv, N)`. `bounded = False` marks a policy that never evicts.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    bounded: ClassVar[bool] = True

    def score(self, view: CacheView) -> torch.Tensor:
        raise NotImplementedError
