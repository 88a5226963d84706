"""Full cache: never evict. The reference every bounded policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy


@dataclass
class Full(Policy):
    name = "full"
    bounded = False

    def score(self, view: CacheView) -> torch.Tensor:
        return view.positions.float()  # never called: a full cache does not compress
