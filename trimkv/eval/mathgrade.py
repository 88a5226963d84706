"""Math answers: the prompt of R-KV (which TRIM-KV follows), `\\boxed{}` extraction and math-verify grading.

Prompt: R-KV's `run_math.py` template (Zefan-Cai/R-KV, HuggingFace/run_math.py), reproduced because the
scores depend on it. It asks for the chain of thought and the final answer as `\\boxed{}`, and is
wrapped in the model's chat template with thinking enabled for reasoning models.

Grading: the answer is the content of the last `\\boxed{...}` (or `\\fbox{...}`) in the output; an
output without one scores 0, as R-KV's parser does for boxed prompts. Prediction and gold are parsed
as LaTeX by math-verify and compared symbolically/numerically (so 1/2, 0.5, \\frac{1}{2} and \\dfrac12
agree). math-verify bounds parsing and comparison with SIGALRM timeouts, which only work in the main
thread of a process: we pass timeouts only there and none elsewhere, so scoring from a worker thread
never raises; the runner scores in its main thread and `score_in_processes` fans out to processes.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, Sample, data_files, read_rows

R1_MATH_PROMPT = (
    "You are given a math problem.\n\nProblem: {question}\n\n You need to solve the problem step by step. "
    "First, you need to provide the chain-of-thought, then provide the final answer.\n\n Provide the final "
    "answer in the format: Final answer:  \\boxed{{}}"
)
TIMEOUT_S = 5


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} in `text` (braces balanced), or None."""
    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found.strip() if found is not None else None


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _plain(answer: str) -> str:
    """A light normal form for the string fallback when math-verify cannot parse a side."""
    answer = re.sub(r"\\(?:left|right|!|,|;|:|displaystyle)", "", answer)
    answer = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", answer)
    return answer.replace("$", "").replace(" ", "").rstrip(".").lower()


def _parse(latex: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(f"${latex}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def math_equal(prediction: str, gold: str) -> bool:
    """Whether two final answers (LaTeX or plain) are mathematically equal."""
    from math_verify import verify

    prediction = re.sub(r"(\d),(\d{3})\b", r"\1\2", prediction)  # thousands separators: 1,000 -> 1000
    gold = re.sub(r"(\d),(\d{3})\b", r"\1\2", gold)
    if _plain(prediction) == _plain(gold):
        return True
    pred_parsed, gold_parsed = _parse(prediction), _parse(gold)
    if not pred_parsed or not gold_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))


def score_math(output: str, gold: str) -> dict[str, Any]:
    extracted = extract_boxed(output)
    correct = extracted is not None and math_equal(extracted, gold)
    return {"score": float(correct), "extracted": extracted}


def _score_pair(pair: tuple[str, str]) -> dict[str, Any]:
    return score_math(*pair)


def score_in_processes(outputs: list[str], golds: list[str], workers: int = 2) -> list[dict[str, Any]]:
    """Score many outputs in worker processes (each scores in its main thread, so timeouts hold)."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_score_pair, zip(outputs, golds), chunksize=16))


class MathBenchmark(Benchmark):
    """Shared by gsm8k, math500 and aime24: one parquet split, one question and one gold per row."""

    files: str  # glob of the split's parquet files under the data dir
    question_key: str = "problem"
    thinking = True

    def gold(self, row: dict[str, Any]) -> str:
        return str(row["answer"]).strip()

    def row_id(self, index: int, row: dict[str, Any]) -> str:
        return str(index)

    def category(self, row: dict[str, Any]) -> str:
        return ""

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        rows = read_rows(data_files(data_dir, self.files))
        samples = [Sample(self.row_id(i, r), R1_MATH_PROMPT.format(question=r[self.question_key]), [self.gold(r)],
                          self.category(r)) for i, r in enumerate(rows)]
        return samples[:limit] if limit is not None else samples

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return score_math(output, sample.references[0])
