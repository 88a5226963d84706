"""GSM8K (openai/gsm8k, config `main`, split `test`, 1,319 problems).

Source: the Hub repo holds parquet under `main/` since the loading script was deleted (commit e53f048);
we pin a later commit of `main`. Gold: the number after `####` in `answer`, commas removed.
Settings (TRIM-KV paper, math reasoning, following R-KV): R-KV's boxed-answer prompt with thinking,
sampling at temperature 0.6 / top-p 0.95, 8 samples per problem averaged into pass@1, and up to 32,768
new tokens (the paper's reasoning budget; R-KV's own script stops GSM8K at 8,192 total tokens).
"""

from __future__ import annotations

from typing import Any

from trimkv.eval.base import GenerationSettings, register
from trimkv.eval.mathgrade import MathBenchmark


@register
class GSM8K(MathBenchmark):
    name = "gsm8k"
    dataset = "openai/gsm8k"
    revision = "740312add88f781978c0658806c59bc2815b9866"
    settings = GenerationSettings(max_new_tokens=32768, temperature=0.6, top_p=0.95, samples=8)
    files = "main/test-*.parquet"
    question_key = "question"

    def gold(self, row: dict[str, Any]) -> str:
        return row["answer"].split("####")[-1].strip().replace(",", "")
