"""LongMemEval (xiaowu0162/longmemeval-cleaned): 500 questions over long user-assistant chat histories.

Source: the cleaned release the LongMemEval README recommends since 2025/09; plain JSON arrays
(`longmemeval_s_cleaned.json` ~115k tokens of history per question, `longmemeval_m_cleaned.json`,
`longmemeval_oracle.json`). The sessions are heterogeneous (empty sessions, `has_answer` only on
evidence turns), so the data step keeps the JSON files as they are instead of forcing them into a
parquet schema; `--subset s|m|oracle` picks the file (default s).

Prompt: LongMemEval's long-context reading setting (`src/generation/run_generation.py`: every session
in time order, JSON history format, user and assistant turns, chain-of-thought), its template
reproduced; `has_answer` flags are dropped. Greedy, up to 512 new tokens (configurable).

Judge: LongMemEval grades with an LLM asked per question type whether the response contains the
answer (`src/evaluation/evaluate_qa.py`, prompts reproduced; abstention questions, id suffix `_abs`,
get the unanswerable-question prompt); correct when the judge's reply contains "yes". The official
judge is gpt-4o-2024-08-06; here it is a local Hugging Face chat model, `--judge-model PATH_OR_ID`
(or `self` to reuse the evaluated model), run greedily for 10 tokens with plain attention, so
numbers depend on the judge chosen. Categories: question_type; `aggregate` adds the task-averaged and
abstention accuracy LongMemEval reports.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, read_rows, register

VARIANTS = {"s": "longmemeval_s_cleaned.json", "m": "longmemeval_m_cleaned.json", "oracle": "longmemeval_oracle.json"}

READING_PROMPT = ("I will give you several history chats between you and a user. Please answer the question based on "
                  "the relevant chat history. Answer the question step by step: first extract all the relevant "
                  "information, and then reason over the information to get the answer.\n\n\nHistory Chats:\n\n"
                  "{history}\n\nCurrent Date: {date}\nQuestion: {question}\nAnswer (step by step):")

_INTRO = "I will give you a question, a correct answer, and a response from a model. Please answer yes if the response " \
         "contains the correct answer. Otherwise, answer no. "
_STEPS = "If the response is equivalent to the correct answer or contains all the intermediate steps to get the " \
         "correct answer, you should also answer yes. If the response only contains a subset of the information " \
         "required by the answer, answer no. "
_TAIL = "\n\nQuestion: {question}\n\nCorrect Answer: {answer}\n\nModel Response: {response}\n\nIs the model response " \
        "correct? Answer yes or no only."
JUDGE_PROMPTS = {
    "single-session-user": _INTRO + _STEPS + _TAIL,
    "single-session-assistant": _INTRO + _STEPS + _TAIL,
    "multi-session": _INTRO + _STEPS + _TAIL,
    "temporal-reasoning": _INTRO + _STEPS + "In addition, do not penalize off-by-one errors for the number of days. If "
    "the question asks for the number of days/weeks/months, etc., and the model makes off-by-one errors (e.g., "
    "predicting 19 days when the answer is 18), the model's response is still correct. " + _TAIL,
    "knowledge-update": _INTRO + "If the response contains some previous information along with an updated answer, "
    "the response should be considered as correct as long as the updated answer is the required answer." + _TAIL,
    "single-session-preference": "I will give you a question, a rubric for desired personalized response, and a "
    "response from a model. Please answer yes if the response satisfies the desired response. Otherwise, answer no. "
    "The model does not need to reflect all the points in the rubric. The response is correct as long as it recalls "
    "and utilizes the user's personal information correctly.\n\nQuestion: {question}\n\nRubric: {answer}\n\nModel "
    "Response: {response}\n\nIs the model response correct? Answer yes or no only.",
}
ABSTENTION_PROMPT = ("I will give you an unanswerable question, an explanation, and a response from a model. Please "
                     "answer yes if the model correctly identifies the question as unanswerable. The model could say "
                     "that the information is incomplete, or some other information is given but the asked "
                     "information is not.\n\nQuestion: {question}\n\nExplanation: {answer}\n\nModel Response: "
                     "{response}\n\nDoes the model correctly identify the question as unanswerable? Answer yes or no "
                     "only.")


def history_text(row: dict[str, Any]) -> str:
    sessions = sorted(zip(row["haystack_dates"], row["haystack_sessions"]), key=lambda pair: pair[0])
    parts = []
    for i, (date, session) in enumerate(sessions, 1):
        turns = [{k: v for k, v in turn.items() if k != "has_answer"} for turn in session]
        parts.append(f"\n### Session {i}:\nSession Date: {date}\nSession Content:\n\n{json.dumps(turns)}\n")
    return "".join(parts)


def judge_prompt(sample: Sample, response: str) -> str:
    template = ABSTENTION_PROMPT if sample.meta["abstention"] else JUDGE_PROMPTS[sample.category]
    return (template.replace("{question}", sample.meta["question"]).replace("{answer}", sample.references[0])
            .replace("{response}", response))


@register
class LongMemEval(Benchmark):
    name = "longmemeval"
    dataset = "xiaowu0162/longmemeval-cleaned"
    revision = "98d7416c24c778c2fee6e6f3006e7a073259d48f"
    settings = GenerationSettings(max_new_tokens=512)
    variant = "s"
    judge_model: str | None = None
    judge_batch_size = 8
    _judge = None
    _evaluated = None

    def configure(self, subset=None, judge_model=None, **options) -> None:
        if subset is not None and subset not in VARIANTS:
            raise ValueError(f"unknown LongMemEval subset {subset!r}; valid: {', '.join(VARIANTS)}")
        self.variant = subset or "s"
        self.judge_model = judge_model
        self._judge = None
        super().configure(**options)

    def bind(self, model, tokenizer) -> None:
        self._evaluated = (model, tokenizer)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        if not self.judge_model:
            raise ValueError("longmemeval needs a judge: --judge-model PATH_OR_HUB_ID (a local chat model) or 'self'")
        rows = read_rows(data_files(data_dir, VARIANTS[self.variant]))
        samples = [Sample(
            id=row["question_id"],
            prompt=READING_PROMPT.replace("{question}", row["question"]).replace("{date}", row["question_date"])
            .replace("{history}", history_text(row)),
            references=[str(row["answer"])],
            category=row["question_type"],
            meta={"question": row["question"], "abstention": row["question_id"].endswith("_abs")},
        ) for row in rows]
        return samples[:limit] if limit is not None else samples

    def judge(self):
        """(model, tokenizer) of the judge, loaded on first use."""
        if self._judge is None:
            if self.judge_model == "self":
                if self._evaluated is None:
                    raise ValueError("--judge-model self needs the runner to bind the evaluated model")
                self._judge = self._evaluated
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                model, _ = self._evaluated or (None, None)
                device = next(model.parameters()).device if model is not None else "cpu"
                judge = AutoModelForCausalLM.from_pretrained(self.judge_model, dtype="auto").to(device).eval()
                self._judge = (judge, AutoTokenizer.from_pretrained(self.judge_model))
        return self._judge

    def ask_judge(self, prompts: list[str]) -> list[str]:
        import torch

        model, tokenizer = self.judge()
        tokenizer.padding_side = "left"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        replies = []
        for start in range(0, len(prompts), self.judge_batch_size):
            chunk = prompts[start:start + self.judge_batch_size]
            if getattr(tokenizer, "chat_template", None) is not None:
                chunk = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=False) for p in chunk]
                inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                inputs = tokenizer(chunk, return_tensors="pt", padding=True)
            inputs = inputs.to(next(model.parameters()).device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=pad)
            replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [r.strip() for r in replies]

    def score_batch(self, samples: list[Sample], outputs: list[str]) -> list[dict[str, Any]]:
        replies = self.ask_judge([judge_prompt(s, o) for s, o in zip(samples, outputs)])
        return [{"score": float("yes" in reply.lower()), "extracted": reply, "abstention": s.meta["abstention"]}
                for s, reply in zip(samples, replies)]

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        return self.score_batch([sample], [output])[0]

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        per_type: dict[str, list[float]] = defaultdict(list)
        abstention = []
        for row in rows:
            per_type[row["category"]].append(row["score"])
            if row.get("abstention"):
                abstention.append(row["score"])
        type_means = [sum(v) / len(v) for v in per_type.values()]
        return {"longmemeval_task_averaged_accuracy": sum(type_means) / len(type_means) if type_means else None,
                "longmemeval_abstention_accuracy": sum(abstention) / len(abstention) if abstention else None,
                "judge_model": self.judge_model}
