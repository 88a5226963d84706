"""MATH-500 (HuggingFaceH4/MATH-500, split `test`, 500 problems; the subset of MATH chosen by OpenAI's PRM800K).

Gold: the `answer` field (the `\\boxed{}` content of `solution`, which is what R-KV grades against).
Per-category scores by `subject`. Settings as GSM8K: boxed prompt with thinking, temperature 0.6,
top-p 0.95, 8 samples per problem, up to 32,768 new tokens (R-KV's script uses 16,384 total).
"""

from __future__ import annotations

from typing import Any

from trimkv.eval.base import GenerationSettings, register
from trimkv.eval.mathgrade import MathBenchmark


@register
class Math500(MathBenchmark):
    name = "math500"
    dataset = "HuggingFaceH4/MATH-500"
    revision = "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"
    settings = GenerationSettings(max_new_tokens=32768, temperature=0.6, top_p=0.95, samples=8)
    files = "**/test*.parquet"

    def row_id(self, index: int, row: dict[str, Any]) -> str:
        return row["unique_id"]

    def category(self, row: dict[str, Any]) -> str:
        return row["subject"]
