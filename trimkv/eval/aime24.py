"""AIME 2024 (HuggingFaceH4/aime_2024, split `train` — the whole set, 30 problems).

The same 30 problems as R-KV's bundled `aime24.jsonl` (AI-MO/aimo-validation-aime filtered to 2024).
Gold: `answer` (an integer string). Settings (TRIM-KV paper): boxed prompt with thinking, temperature
0.6, top-p 0.95, 64 samples per problem averaged into pass@1, up to 32,768 new tokens (R-KV: 32,768).
"""

from __future__ import annotations

from typing import Any

from trimkv.eval.base import GenerationSettings, register
from trimkv.eval.mathgrade import MathBenchmark


@register
class AIME24(MathBenchmark):
    name = "aime24"
    dataset = "HuggingFaceH4/aime_2024"
    revision = "2fe88a2f1091d5048c0f36abc874fb997b3dd99a"
    settings = GenerationSettings(max_new_tokens=32768, temperature=0.6, top_p=0.95, samples=64)
    files = "**/train*.parquet"

    def row_id(self, index: int, row: dict[str, Any]) -> str:
        return str(row["id"])
