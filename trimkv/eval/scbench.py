"""SCBench (microsoft/SCBench, split `test`): shared-context, multi-turn; 12 subsets `scbench_*`.

Source: native parquet `scbench_<subset>/test-*.parquet` (loads under datasets>=4; commit fcebb74
renamed train -> test). A row is one session: `id`, `context`, `multi_turns[{input, answer, ...}]`.

Protocol: SCBench's multi-turn mode with golden context (MInference `scbench/run_scbench.py` and
`eval_utils.py`). Turn 1 is the subset's template around the context and the first query; each
later turn appends the previous turn's gold answer as the assistant message and the next query as a
user message. Every turn becomes one `Sample` (id `<subset>/<row>/<turn>`); the runner runs a
session's turns in order on ONE cache: the bounded cache compressed after turn k is what turn k+1
builds on (the point of SCBench for KV eviction). The model's own answer is generated on a copy of
the cache, so the kept state holds the gold history, as in golden-context mode. Templates and
generation lengths per subset are SCBench's (reproduced). Greedy decoding; the first turn is cut in
the middle to `--max-input-tokens` (SCBench: the model window minus room for every turn's answer).

Scoring (MInference `scbench/compute_scores.py`), per turn:
kv, prefix_suffix: gold is a substring of the output; vt: share of gold strings found (lowercased);
qa_eng, many_shot: some gold, uppercased, is a substring of the uppercased output; qa_chn: character
F1; choice_eng: first letter / "answer is" prefix / first standalone A-D, against [option, letter];
summary: ROUGE-Lsum; mf: the first number equals the numeric gold; repoqa: BLEU (nltk, smoothing 4)
of the first code block of the output against every function of the repo, pass when the best match
is the asked function with similarity >= 0.8; summary_with_needles / repoqa_and_kv: per turn by its
sub-task (passkey: first integer), reported separately as categories `<subset>:<sub-task>`.
Choices we made where upstream differs: a plain-string gold is wrapped as [gold] (upstream iterates
over its characters in vt / qa_chn / many_shot, a bug); repoqa does not use tree-sitter to cut the
function out of a code block; mf follow-ups use each turn's own "What is ...?" prefix (upstream's
chat mode reuses the last one).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimkv.eval import metrics
from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, option_list, read_rows, register

SUBSETS = ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng",
           "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_summary", "scbench_mf",
           "scbench_summary_with_needles", "scbench_repoqa_and_kv")

MAX_NEW_TOKENS = {"scbench_choice_eng": 40, "scbench_qa_eng": 40, "scbench_qa_chn": 40, "scbench_kv": 150,
                  "scbench_mf": 5, "scbench_prefix_suffix": 150, "scbench_passkey": 15, "scbench_repoqa": 1024,
                  "scbench_summary": 200, "scbench_vt": 30, "scbench_many_shot": 10}
MIXED_MAX_NEW_TOKENS = {"scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
                        "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80}}

_CHOICE = "Question: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\nThe the correct answer is"
FIRST_TURN = {
    "scbench_kv": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}\n\n" + _CHOICE,
    "scbench_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                      "Question: {question}\nAnswer:",
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{context}\n\n{input}",
    "scbench_repoqa": "Based on the function description and code context, please retrieve and repeat the exact "
                      "described function from the code context in a code block wrapped by ```:\n\n{context}\n\n{input}",
}
FOLLOW_UP = {  # the user message of a later turn (chat mode)
    "scbench_choice_eng": _CHOICE,
    "scbench_qa_eng": "Question: {question}\nAnswer:",
    "scbench_qa_chn": "问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{input}",
}
PLAIN_FOLLOW_UP = {  # after the gold answer, without a chat template
    "scbench_choice_eng": "\n\nQuestion: {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\nThe letter of the correct answer is",
}


def _fill(template: str, **values) -> str:
    for key, value in values.items():  # str.replace: contexts are full of braces
        template = template.replace("{" + key + "}", str(value))
    return template


def _mf_prefix(question: str) -> str:
    found = re.findall(r"The .+ is", question)
    return f"What is {found[0].lower()[:-3]}?" if found else ""


def _first_int(text: str) -> str:
    return next((piece for piece in re.split(r"[^0-9]", text) if piece), "")


def _choice_correct(output: str, labels: list[str]) -> bool:
    pred = output.strip()
    if not pred:
        return False
    if pred[0] in "ABCD":
        return pred[0] in labels
    if pred in labels:
        return True
    for ch in "\n\"'.,?!{}":
        pred = pred.replace(ch, " ")
    pred = " ".join(pred.split())
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        at = pred.find(prefix)
        if at == -1:
            continue
        rest = pred[at + len(prefix) + 1:]
        return bool(rest) and any(rest.startswith(label) for label in labels)
    return next((word in labels for word in pred.split() if word in ("A", "B", "C", "D")), False)


def _math_find(output: str, label) -> bool:
    match = re.search(r"\d+\.\d+|\d+", output)
    if match is None:
        return False
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        return int(float(match.group(0))) == int(label)
    return float(match.group(0)) == float(label)


def code_block(output: str) -> str:
    """First ``` fenced block of the output (its content), else the whole stripped output."""
    blocks = re.findall(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", output.strip(), re.DOTALL | re.MULTILINE)
    return blocks[0] if blocks else output.strip()


def function_similarity(candidate: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu([re.split(r"\s+", reference.strip())], re.split(r"\s+", candidate.strip()),
                         smoothing_function=SmoothingFunction().method4)


def repoqa_pass(output: str, name: str, needles: list[tuple[str, str]], threshold: float = 0.8) -> tuple[bool, str]:
    """Whether the function the output repeats is, by BLEU, closest to the asked one (at >= threshold)."""
    candidate = code_block(output)
    best_name, best = None, 0.0
    for needle_name, needle in needles:
        similarity = function_similarity(candidate, needle)
        if similarity > best:
            best_name, best = needle_name, similarity
    return best_name == name and best >= threshold, candidate


@register
class SCBench(Benchmark):
    name = "scbench"
    dataset = "microsoft/SCBench"
    revision = "main"  # not pinned yet: the data step records the commit it resolved to
    settings = GenerationSettings(max_new_tokens=150)  # per turn: MAX_NEW_TOKENS
    multi_turn = True

    def __init__(self):
        self.subsets = list(SUBSETS)

    def configure(self, subset=None, **options) -> None:
        self.subsets = option_list(subset, SUBSETS, "SCBench subset")
        super().configure(**options)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        samples = []
        for subset in self.subsets:
            rows = read_rows(data_files(data_dir, f"{subset}/*.parquet"))
            rows = rows[:limit] if limit is not None else rows
            needles: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for row in rows:
                for turn in row["multi_turns"]:
                    if row.get("repo") is not None and turn.get("name") is not None:
                        needles[row["repo"]].append((turn["name"], turn["answer"]))
            for i, row in enumerate(rows):
                conversation = f"{subset}/{row.get('id', i)}"
                for k, turn in enumerate(row["multi_turns"]):
                    samples.append(self._turn(subset, conversation, row, k, turn, needles))
        return samples

    def _turn(self, subset, conversation, row, k, turn, needles) -> Sample:
        task = turn.get("task") or subset  # mixed subsets name a sub-task per turn
        values = {"context": row["context"], "input": turn["input"], "question": turn["input"],
                  "prefix": _mf_prefix(str(turn["input"]))}
        if turn.get("options") is not None:
            values.update(zip("ABCD", turn["options"]))
        if k == 0:
            prompt = _fill(FIRST_TURN.get(subset, "{context}\n\n{input}"), **values)
            plain_after_gold = ""
        else:
            prompt = _fill(FOLLOW_UP.get(subset, "{input}"), **values)
            plain = PLAIN_FOLLOW_UP.get(subset, ("." if task == "scbench_passkey" else "") + "\n\n" +
                                        FOLLOW_UP.get(subset, "{input}"))
            plain_after_gold = _fill(plain, **values)
        answer = turn["answer"]
        if subset == "scbench_choice_eng":
            references = [answer, "ABCD"[list(turn["options"]).index(answer)]]
        else:
            references = list(answer) if isinstance(answer, (list, tuple)) else [answer]
        limits = MIXED_MAX_NEW_TOKENS.get(subset)
        meta = {"conversation": conversation, "turn": k, "task": task, "gold_text": answer,
                "plain_after_gold": plain_after_gold,
                "max_new_tokens": limits[task] if limits else MAX_NEW_TOKENS[subset]}
        if task == "scbench_repoqa":
            meta.update(name=turn.get("name"), needles=needles[row.get("repo")], lang=row.get("lang"))
        category = f"{subset}:{task}" if subset in MIXED_MAX_NEW_TOKENS else subset
        return Sample(f"{conversation}/{k}", prompt, references, category, meta)

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        task, refs = sample.meta["task"], sample.references
        extracted: Any = output.strip()
        if task in ("scbench_kv", "scbench_prefix_suffix"):
            score = float(str(refs[0]) in output)
        elif task == "scbench_vt":
            score = round(sum(str(r).lower() in output.lower() for r in refs) / len(refs), 2)
        elif task in ("scbench_qa_eng", "scbench_many_shot"):
            score = float(any(str(r).upper() in output.strip().upper() for r in refs))
        elif task == "scbench_qa_chn":
            score = max(metrics.char_f1_zh(output, str(r)) for r in refs)
        elif task == "scbench_choice_eng":
            score = float(_choice_correct(output, [str(r) for r in refs]))
        elif task == "scbench_summary":
            score = metrics.rouge_lsum(output, str(refs[0]))
        elif task == "scbench_mf":
            score = float(_math_find(output, refs[0]))
        elif task == "scbench_passkey":
            extracted = _first_int(output)
            score = float(extracted == str(refs[0]))
        elif task == "scbench_repoqa":
            passed, extracted = repoqa_pass(output, sample.meta["name"], sample.meta["needles"])
            score = float(passed)
        else:
            raise ValueError(f"SCBench: no scorer for task {task!r}")
        return {"score": float(score), "extracted": extracted}
