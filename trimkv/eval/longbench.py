"""LongBench v1 (THUDM/LongBench, split `test`): 21 tasks, or the LongBench-E `<task>_e` variants.

Source: `main` of THUDM/LongBench holds a loading script + `data.zip`, which `datasets>=4` refuses. The
Hub's automatic parquet export, branch `refs/convert/parquet`, has the raw schema as
`<task>/test/0000.parquet` (`_e` tasks included); the data step downloads that branch and records
the commit it resolved to in the manifest (pin it in the config with `--revision`). Fields: input,
context, answers, length, dataset, language, all_classes, _id.

Prompts, generation lengths and metrics: LongBench's `config/dataset2prompt.json`,
`config/dataset2maxlen.json` and `eval.py` (THUDM/LongBench); the prompt strings are reproduced
verbatim since the scores depend on them. As in LongBench's `pred.py`: the prompt is cut in the middle
to the model's input budget (`--max-input-tokens`; LongBench uses the model's context minus room for
generation, e.g. 127,500 for a 128k model), the chat template is applied except for the few-shot and
code tasks (trec, triviaqa, samsum, lsht, lcc, repobench-p), decoding is greedy, and trec / triviaqa /
samsum / lsht score only the first output line. Metrics in `trimkv.eval.metrics`; a sample's score is
the max over its gold answers, in [0, 1]; `aggregate` reports LongBench's x100 per-task scores,
their average and, for `_e` tasks, the 0-4k / 4-8k / 8k+ length buckets.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from trimkv.eval import metrics
from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, option_list, read_rows, register

_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any "
             "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
             "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}"
             "\nAnswer:")
_QASPER = ("If the question cannot be answered based on the information in the article, write \"unanswerable\". "
           "If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
           "explanation.")

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question as concisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using "
              "a single phrase or sentence if possible. " + _QASPER + "\n\nArticle: {context}\n\n Answer the "
              "question based on the above article as concisely as you can, using a single phrase or sentence if "
              "possible. " + _QASPER + "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
                       "\n\n问题：{input}\n回答：",
    "hotpotqa": _PASSAGES,
    "2wikimqa": _PASSAGES,
    "musique": _PASSAGES,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
                     "is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
                            "\n\nPlease enter the number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
                            "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

METRICS = {
    "narrativeqa": metrics.qa_f1, "qasper": metrics.qa_f1, "multifieldqa_en": metrics.qa_f1,
    "multifieldqa_zh": metrics.qa_f1_zh, "hotpotqa": metrics.qa_f1, "2wikimqa": metrics.qa_f1,
    "musique": metrics.qa_f1, "dureader": metrics.rouge_zh, "gov_report": metrics.rouge_l, "qmsum": metrics.rouge_l,
    "multi_news": metrics.rouge_l, "vcsum": metrics.rouge_zh, "trec": metrics.classification,
    "triviaqa": metrics.qa_f1, "samsum": metrics.rouge_l, "lsht": metrics.classification,
    "passage_retrieval_en": metrics.retrieval, "passage_count": metrics.count,
    "passage_retrieval_zh": metrics.retrieval_zh, "lcc": metrics.code_sim, "repobench-p": metrics.code_sim,
}

TASKS = tuple(PROMPTS)
E_TASKS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
           "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}


def base_task(task: str) -> str:
    return task.removesuffix("_e")


@register
class LongBench(Benchmark):
    name = "longbench"
    dataset = "THUDM/LongBench"
    revision = "refs/convert/parquet"  # the data step records the commit this resolved to
    settings = GenerationSettings(max_new_tokens=128)  # per task: MAX_NEW_TOKENS

    def __init__(self):
        self.tasks = list(TASKS)

    def configure(self, subset=None, **options) -> None:
        self.tasks = option_list(subset, TASKS + tuple(f"{t}_e" for t in E_TASKS), "LongBench task")
        super().configure(**options)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        samples = []
        for task in self.tasks:
            rows = read_rows(data_files(data_dir, f"{task}/test/*.parquet"))
            for i, row in enumerate(rows[:limit] if limit is not None else rows):
                base = base_task(task)
                samples.append(Sample(
                    id=f"{task}/{row.get('_id') or i}",
                    prompt=PROMPTS[base].format(context=row["context"], input=row["input"]),
                    references=list(row["answers"]),
                    category=task,
                    meta={"task": base, "all_classes": list(row.get("all_classes") or []),
                          "length": row.get("length"), "max_new_tokens": MAX_NEW_TOKENS[base]},
                ))
        return samples

    def render(self, sample: Sample, tokenizer, thinking: bool = False) -> str:
        if sample.meta["task"] in NO_CHAT:
            return sample.prompt
        return super().render(sample, tokenizer, thinking)

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        task = sample.meta["task"]
        prediction = output.lstrip("\n").split("\n")[0] if task in FIRST_LINE else output
        metric = METRICS[task]
        if metric is metrics.classification:
            values = [metric(prediction, ref, sample.meta["all_classes"]) for ref in sample.references]
        else:
            values = [metric(prediction, ref) for ref in sample.references]
        result = {"score": max(values, default=0.0), "extracted": prediction.strip()}
        if sample.category.endswith("_e"):
            result["length"] = sample.meta["length"]  # for the LongBench-E length buckets
        return result

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        per_task: dict[str, list[float]] = defaultdict(list)
        buckets: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            per_task[row["category"]].append(row["score"])
            length = row.get("length")
            if row["category"].endswith("_e") and length is not None:
                bucket = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
                buckets[row["category"]][bucket].append(row["score"])
        scores = {t: round(100 * sum(v) / len(v), 2) for t, v in sorted(per_task.items())}
        out: dict[str, Any] = {"longbench_task_scores_x100": scores,
                               "longbench_average_x100": round(sum(scores.values()) / len(scores), 2) if scores else None}
        if buckets:
            out["longbench_e_length_buckets_x100"] = {
                t: {b: round(100 * sum(v) / len(v), 2) for b, v in sorted(bs.items())} for t, bs in sorted(buckets.items())}
        return out
