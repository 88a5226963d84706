"""Text metrics shared by the long-context benchmarks, written as our code after the official definitions.

LongBench (THUDM/LongBench `metrics.py`, `eval.py`):
- `qa_f1`: SQuAD-style token F1 after lowercasing and removing punctuation, articles and extra spaces;
- `qa_f1_zh`: F1 over jieba words with Chinese + ASCII punctuation removed;
- `rouge_l`: ROUGE-L F over whitespace tokens with Google's `rouge-score` (no stemming, a whitespace
  tokenizer so case and non-ASCII text are kept). LongBench itself calls the `rouge` package
  (pltrdy), whose "rouge-l" is summary-level: union LCS over sentences split on ".", with the
  beta-weighted F of the original ROUGE script. Our values are therefore close to, not identical
  with, LongBench's on multi-sentence outputs; they are identical for a single sentence when
  precision equals recall. Comparisons between policies are unaffected.
- `rouge_zh`: `rouge_l` over jieba words joined by spaces;
- `classification`: the classes named in the prediction, minus those that are strict substrings of
  the gold class; 1/len(matches) if the gold class is among them. (Upstream removes items from the
  list while iterating over it, which can skip a removal; we remove all such classes. Its fallback to
  difflib never runs because it tests `list != 0`, so an empty match scores 0, as here.)
- `retrieval` / `retrieval_zh`: share of the numbers in the prediction equal to the gold paragraph id;
- `count`: share of the numbers in the prediction equal to the gold count;
- `code_sim`: Levenshtein ratio (rapidfuzz, same value as fuzzywuzzy's `fuzz.ratio`) / 100 between
  the first prediction line without backticks, '#' or '//' and the gold line.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ASCII_PUNCT = set(string.punctuation)
_ALL_PUNCT = _ASCII_PUNCT | set(CN_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """Lowercase; drop ASCII punctuation, the articles a/an/the and repeated whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase; drop Chinese and ASCII punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCT and not ch.isspace())


def f1(prediction: list, reference: list) -> float:
    """Token-multiset F1."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    return f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def jieba_words(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


def qa_f1_zh(prediction: str, reference: str) -> float:
    pred = [w for w in (normalize_zh_answer(t) for t in jieba_words(prediction)) if w]
    ref = [w for w in (normalize_zh_answer(t) for t in jieba_words(reference)) if w]
    return f1(pred, ref)


def char_f1_zh(prediction: str, reference: str) -> float:
    """SCBench's Chinese QA F1: one character per token after `normalize_zh_answer`."""
    return f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(reference)))


class _WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=4)
def _rouge_scorer(kind: str, whitespace: bool):
    from rouge_score import rouge_scorer

    tokenizer = _WhitespaceTokenizer() if whitespace else None
    return rouge_scorer.RougeScorer([kind], use_stemmer=False, tokenizer=tokenizer)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over whitespace tokens; 0 when either side is empty."""
    if not prediction.split() or not reference.split():
        return 0.0
    return _rouge_scorer("rougeL", True).score(reference, prediction)["rougeL"].fmeasure


def rouge_zh(prediction: str, reference: str) -> float:
    return rouge_l(" ".join(jieba_words(prediction)), " ".join(jieba_words(reference)))


def rouge_lsum(prediction: str, reference: str) -> float:
    """ROUGE-Lsum F (sentences split on newlines), as HF `evaluate`'s "rouge" reports it for SCBench:
    its default tokenizer lowercases and keeps alphanumerics, and it uses no stemmer."""
    return _rouge_scorer("rougeLsum", False).score(reference, prediction)["rougeLsum"].fmeasure


def classification(prediction: str, reference: str, all_classes: list[str]) -> float:
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _number_share(prediction: str, gold: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == gold for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str) -> float:
    found = re.findall(r"Paragraph (\d+)", reference)
    return _number_share(prediction, found[0]) if found else 0.0


def retrieval_zh(prediction: str, reference: str) -> float:
    found = re.findall(r"段落(\d+)", reference)
    return _number_share(prediction, found[0]) if found else 0.0


def count(prediction: str, reference: str) -> float:
    return _number_share(prediction, str(reference))


def code_sim(prediction: str, reference: str) -> float:
    from rapidfuzz import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    if not line or not reference:  # fuzzywuzzy scores an empty side 0
        return 0.0
    return round(fuzz.ratio(line, reference)) / 100  # fuzzywuzzy rounds the ratio to an integer
