"""trimkv: learned token retention (TRIM-KV) and a memory-bounded KV cache for Hugging Face decoder LMs."""

from trimkv import attention  # noqa: F401 (registers the trimkv_* attention implementations with transformers)
from trimkv.cache import BoundedCache, make_cache
from trimkv.checkpoint import load_gates, load_pretrained, save_gates
from trimkv.gates import GateConfig, RetentionGate, attach_gates
from trimkv.hooks import prepare, retention, unprepare
from trimkv.locret import LocretConfig, attach_retaining_heads, save_retaining_heads
from trimkv.policies import POLICIES
from trimkv.seer import SeerConfig, attach_attn_gates, save_attn_gates

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "BoundedCache",
    "GateConfig",
    "LocretConfig",
    "RetentionGate",
    "SeerConfig",
    "attach_attn_gates",
    "attach_gates",
    "attach_retaining_heads",
    "load_gates",
    "load_pretrained",
    "make_cache",
    "prepare",
    "retention",
    "save_attn_gates",
    "save_gates",
    "save_retaining_heads",
    "unprepare",
]
