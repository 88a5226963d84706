"""LongBench-V2 (THUDM/LongBench-v2, split `train` — all 503 multiple-choice questions).

Source: one `data.json` (plain JSON, loads under datasets>=4); the data step converts it to parquet.
Fields: _id, domain, sub_domain, difficulty (easy/hard), length (short/medium/long), question,
choice_A..choice_D, answer (A-D), context.

Prompt: the zero-shot template `prompts/0shot.txt` of THUDM/LongBench (reproduced), inside the chat
template; greedy, 128 new tokens, the context cut in the middle to `--max-input-tokens` (LongBench-V2's
`pred.py` uses the model's window, e.g. 120,000 tokens). Answer: after removing `*`, the letter in
"The correct answer is (X)" or else "The correct answer is X"; correct when it equals `answer`
(no extracted letter scores 0, LongBench-V2's non-"compensated" accuracy). Categories: difficulty;
`aggregate` adds LongBench-V2's easy / hard / short / medium / long table (x100).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, read_rows, register

PROMPT = ("Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
          "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
          "Format your response as follows: \"The correct answer is (insert answer here)\".")


def extract_choice(output: str) -> str | None:
    text = output.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", text) or re.search(r"The correct answer is ([A-D])", text)
    return match.group(1) if match else None


@register
class LongBenchV2(Benchmark):
    name = "longbench_v2"
    dataset = "THUDM/LongBench-v2"
    revision = "main"  # not pinned yet: the data step records the commit it resolved to
    settings = GenerationSettings(max_new_tokens=128)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        rows = read_rows(data_files(data_dir, "**/*.parquet"))
        samples = [Sample(
            id=row["_id"],
            # str.replace, not format: the contexts are full of braces
            prompt=PROMPT.replace("{question}", row["question"].strip()).replace("{A}", row["choice_A"].strip())
            .replace("{B}", row["choice_B"].strip()).replace("{C}", row["choice_C"].strip())
            .replace("{D}", row["choice_D"].strip()).replace("{context}", row["context"].strip()),
            references=[row["answer"]],
            category=row["difficulty"],
            meta={"length": row["length"], "domain": row["domain"]},
        ) for row in rows]
        return samples[:limit] if limit is not None else samples

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        letter = extract_choice(output)
        return {"score": float(letter == sample.references[0]), "extracted": letter,
                "length": sample.meta["length"]}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        groups: dict[str, list[float]] = defaultdict(list)
        for row in rows:
            groups["overall"].append(row["score"])
            groups[row["category"]].append(row["score"])
            groups[row["length"]].append(row["score"])
        order = ["overall", "easy", "hard", "short", "medium", "long"]
        return {"longbench_v2_x100": {k: round(100 * sum(groups[k]) / len(groups[k]), 1) for k in order if groups[k]}}
