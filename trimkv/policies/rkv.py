"""R-KV, redundancy-aware KV compression for reasoning models (Cai et al., 2025, arXiv 2505.24133).

Importance as SnapKV (the last `window_size` queries' pooled attention), minus redundancy: a key that
is very similar to other keys carries little new information.

    redundancy_i = softmax_i( mean_j cos(k_j, k_i) )   over the candidates, the diagonal zeroed, and for
                   each key j its most recent strongly similar key (cos > threshold) exempted
    score_i = lambda * importance_i - (1 - lambda) * redundancy_i

and the window's own tokens always kept. Defaults are the authors' code: window 8, kernel 7 (max
pooling), lambda 0.07, threshold 0.5, compression every time the cache fills (buffer_size tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimkv.policies.base import CacheView, Policy
from trimkv.policies.snapkv import keep_window, pooled_window_votes


def redundancy(view: CacheView, threshold: float) -> torch.Tensor:
    """(B, H_kv, N) softmax over candidates of the mean cosine similarity to the other keys."""
    keys = view.keys.float()
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    cos = unit @ unit.transpose(-1, -2)  # (B, H, N, N): row j, column i
    N = cos.shape[-1]
    eye = torch.eye(N, dtype=torch.bool, device=cos.device)
    valid = view.valid[:, :, None, :] & view.valid[:, :, :, None]  # (B, 1, N, N)
    cos = cos.masked_fill(eye | ~valid, 0.0)
    # For each key j, the most recent key i that is strongly similar to it is exempted (kept as j's representative).
    similar = (cos > threshold) & valid
    slot = torch.arange(N, device=cos.device)
    latest = torch.where(similar, slot, -1).amax(dim=-1, keepdim=True)  # (B, H, N, 1)
    cos = cos.masked_fill((slot == latest) & (latest >= 0), 0.0)
    count = view.valid.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    mean = cos.sum(dim=2) / count  # (B, H, N): over rows j
    return torch.softmax(mean.masked_fill(~view.valid, -torch.inf), dim=-1)


@dataclass
class RKV(Policy):
    name = "rkv"
    query_window: int = 8
    kernel_size: int = 7
    mix_lambda: float = 0.07
    threshold: float = 0.5

    def score(self, view: CacheView) -> torch.Tensor:
        importance = pooled_window_votes(view, self.kernel_size, "max")
        score = self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy(view, self.threshold)
        return keep_window(score, view, self.query_window)
