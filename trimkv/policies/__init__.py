"""Eviction rules, one module each, registered by name in POLICIES.

Add a policy: a dataclass subclass of `Policy` in its own module with the formula and its source in
the docstring, a `score(view)` returning (B, H_kv, N), an entry below, and a hand-made test case.
"""

from trimkv.policies.base import CacheView, Policy
from trimkv.policies.full import Full
from trimkv.policies.h2o import H2O
from trimkv.policies.keydiff import KeyDiff
from trimkv.policies.knorm import KNorm
from trimkv.policies.locret import Locret
from trimkv.policies.random import Random
from trimkv.policies.rkv import RKV
from trimkv.policies.seerattn_r import SeerAttnR
from trimkv.policies.snapkv import SnapKV
from trimkv.policies.streaming import StreamingLLM
from trimkv.policies.tova import TOVA
from trimkv.policies.trimkv import TrimKV

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (TrimKV, Full, StreamingLLM, H2O, SnapKV, KeyDiff, RKV, TOVA,
                                                                KNorm, Random, Locret, SeerAttnR)}


def get_policy(name: str, **kwargs) -> Policy:
    """Instantiate a policy by name, with a clear error listing the valid names."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad option for policy {name!r}: {e}") from None


__all__ = ["POLICIES", "CacheView", "Policy", "get_policy"]
