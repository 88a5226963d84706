"""LongProc (princeton-pli/LongProc): long procedural generation — the output, not the input, is long.

Source: not on the Hugging Face Hub; the data step downloads the GitHub repository at a pinned commit
and keeps its `data/` folder: `data/<task>/<task>_<len>.json` (JSON arrays), `data/<task>/prompts.yaml`
(the `USER_PROMPT` template, read from the data, not copied here) and the html pages of html_to_tsv.

Tasks (`--subset`, default all of these): path_traversal, tom_tracking, countdown, html_to_tsv at
0.5k / 2k / 8k output tokens, pseudo_to_code at 0.5k / 2k. (travel_planning is not implemented: its
demonstration builder and plan checker are not reproduced yet.) Settings as HELMET's LongProc
configs: chat template, greedy, the first 100 items of each file, max new tokens 1024 / 3072 / 10240
for 0.5k / 2k / 8k.

Scoring, our code after `longproc/longproc_data.py` and the evaluators of the LongProc repo; each
result holds LongProc's `accuracy`, `partial_accuracy` and `extraction_rate` (html_to_tsv: `f1`,
`precision`, `recall`); `score` is accuracy (html_to_tsv: row F1):
- path_traversal: the text between the first <Route> and </Route> equals the gold route; partial =
  (index of the first differing line + 1) / gold lines, LongProc's count;
- tom_tracking: lines "- Step N: ..." (from the last "- Step 0:") compared after LongProc's
  normalization; partial = first differing step / gold steps;
- countdown: the three equations in <Solution> use the numbers and reach the target; partial = how far
  the "# Search Procedure" follows the reference depth-first search, which we generate with the
  procedure the prompt describes (two fixed examples, [40, 19, 23, 7] -> 29 and [9, 16, 6, 18] -> 12,
  form the prompt's demonstration, as in LongProc);
- html_to_tsv: the ```tsv block against the gold TSV, rows compared after normalizing cells (lowercase,
  no punctuation, articles or spaces), unordered precision / recall / F1;
- pseudo_to_code: the ```cpp block compiled with g++ and run on every test case (stdin -> stdout,
  compared line by line without trailing spaces); needs g++ on PATH.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import string
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, option_list, register

LENGTHS = {"path_traversal": ("0.5k", "2k", "8k"), "tom_tracking": ("0.5k", "2k", "8k"),
           "countdown": ("0.5k", "2k", "8k"), "html_to_tsv": ("0.5k", "2k", "8k"), "pseudo_to_code": ("0.5k", "2k")}
SUBSETS = tuple(f"{task}_{length}" for task, lengths in LENGTHS.items() for length in lengths)
MAX_NEW_TOKENS = {"0.5k": 1024, "2k": 3072, "8k": 10240}
ITEMS_PER_FILE = 100


def _between(text: str, tag: str) -> str | None:
    start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
    if start == -1 or end == -1:
        return None
    return text[start + len(tag) + 2:end].strip()


# ---- path traversal ----

def eval_path_traversal(output: str, reference: str) -> dict[str, float]:
    route = _between(output, "Route")
    if route is None:
        return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}
    gold = reference.strip().split("\n")
    if route == reference.strip():
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}
    pred = route.split("\n")
    i = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if g != p:
            break
    return {"accuracy": 0.0, "partial_accuracy": (i + 1) / len(gold), "extraction_rate": 1.0}


# ---- theory-of-mind tracking ----

_TOM_DROP = r"\b(a|an|the|on|in|at|step|thinks|think|believes|believe|is|are|of|location|know|knows|belief)\b"


def _tom_beliefs(text: str) -> list[str]:
    beliefs = []
    for line in text.strip().split("\n"):
        if not re.match(r"^- Step \d+:", line):
            continue
        content = "".join(ch for ch in line.split("-", 1)[1].strip().lower()
                          if ch not in string.punctuation and ch != "’")
        content = " ".join(re.sub(_TOM_DROP, " ", content).split())
        if content:
            beliefs.append(content)
    return beliefs


def eval_tom_tracking(output: str, reference: str) -> dict[str, float]:
    pred = "\n".join(line for line in output.splitlines() if line.strip().startswith("-"))
    gold = "\n".join(line for line in reference.splitlines() if line.strip().startswith("-"))
    if "- Step 0:" in pred:
        pred = pred[pred.rfind("- Step 0:"):]
    pred_b, gold_b = _tom_beliefs(pred), _tom_beliefs(gold)
    if pred_b == gold_b:
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}
    first_diff = next((i for i, (p, g) in enumerate(zip(pred_b, gold_b)) if p != g), None)
    matched = first_diff if first_diff is not None else min(len(pred_b), len(gold_b))
    return {"accuracy": 0.0, "partial_accuracy": matched / len(gold_b) if gold_b else 0.0, "extraction_rate": 1.0}


# ---- countdown ----

_MAX_INTERMEDIATE = 2000
_DIV_BY_ZERO = "division by zero"


def _indent(depth: int) -> str:
    return "" if depth == 0 else " " * depth + "|- "


def countdown_procedure(nums: list[int], target: int) -> tuple[list[str], str]:
    """The depth-first search the LongProc countdown prompt describes, written out line by line:
    pairs in order, the larger number first, + - * / tried in that order, a branch dropped on a
    decimal, a result >= 2000, or a wrong final value. Returns (the three solution equations, text)."""
    log: list[str] = []
    path: list[str] = []

    def search(numbers: list, step: str | None, depth: int) -> bool:
        if step is not None:
            head = numbers[0]
            if head == _DIV_BY_ZERO:
                log.append(f"\n{_indent(depth)}Try {step}. drop this branch.")
                return False
            if head % 1 != 0:
                log.append(f"\n{_indent(depth)}Try {step}. {head:.1f} is a decimal, drop this branch.")
                return False
            if head >= _MAX_INTERMEDIATE:
                log.append(f"\n{_indent(depth)}Try {step}. {head} exceeds the maximum intermediate result, "
                           "drop this branch.")
                return False
        if len(numbers) == 1:
            found = numbers[0] == target
            log.append(f"\n{_indent(depth)}Try {step}. Evaluate {numbers[0]} {'==' if found else '!='} {target}, "
                       + ("target found!" if found else "drop this branch."))
            return found
        pairs = [(i, j) for i in range(len(numbers)) for j in range(i + 1, len(numbers))]
        options = [(numbers[i], numbers[j]) for i, j in pairs]
        if step is not None:
            log.append(f"\n{_indent(depth)}Try {step}. Add {numbers[0]} to the number set.")
        if len(numbers) == 2:
            log.append(f" Current number set: {numbers}, target: {target}, just two numbers left.")
        else:
            state = "Initial number set" if step is None else " Current number set"
            log.append(f"{state}: {numbers}, target: {target}. Options for choosing two numbers: {options}.")
            depth += 1
        for i, j in pairs:
            a, b = numbers[i], numbers[j]
            rest = [x for k, x in enumerate(numbers) if k not in (i, j)]
            if len(numbers) > 2:
                log.append(f"\n{_indent(depth)}Pick two numbers ({a}, {b}) (numbers left: {rest}). "
                           "Try possible operations.")
            a, b = max(a, b), min(a, b)
            tries = [(a + b, f"{a} + {b} = {a + b}"), (a - b, f"{a} - {b} = {a - b}"), (a * b, f"{a} * {b} = {a * b}")]
            if b == 0:
                tries.append((_DIV_BY_ZERO, f"{a} / {b} (invalid operation)"))
            elif a % b == 0:
                tries.append((a // b, f"{a} / {b} = {a // b}"))
            else:
                tries.append((a / b, f"{a} / {b} = {a / b:.1f}"))
            for value, equation in tries:
                path.append(equation)
                if search([value] + rest, equation, depth + 1):
                    return True
                path.pop()
        return False

    if not search(list(nums), None, 0):
        raise ValueError(f"countdown {nums} -> {target} has no solution")
    s0, s1, s2 = path
    text = ("# Search Procedure\n" + "".join(log) + "\n\n"
            f"Now we have found the target, let's trace back the solution:\nFinal step: {s2}\nThe step before: {s1}\n"
            f"The first step: {s0}\n\nOutput the solution in the required format:\n<Solution>\n{s0}\n{s1}\n{s2}\n"
            "</Solution>\n")
    return path, text


def countdown_demonstration() -> str:
    examples = []
    for nums, target in (([40, 19, 23, 7], 29), ([9, 16, 6, 18], 12)):
        examples.append(f"# Example\nNumbers: {nums}\nTarget: {target}\n\n{countdown_procedure(nums, target)[1]}")
    return "\n\n".join(examples)


def countdown_solution_correct(nums: list[int], target: int, solution: str) -> bool:
    pool = list(nums)
    lines = solution.split("\n")
    if len(lines) != 3:
        return False
    for line in lines:
        m = re.fullmatch(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*", line)
        if m is None:
            return False
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        ok = {"+": a + b == c, "-": a - b == c, "*": a * b == c, "/": b != 0 and a == b * c}[op]
        if not ok or a not in pool:
            return False
        pool.remove(a)
        if b not in pool:
            return False
        pool.remove(b)
        pool.append(c)
    return pool[0] == target


def _procedure_progress(pred: str, gold: str) -> float:
    pred_lines, gold_lines = pred.strip().split("\n"), gold.strip().split("\n")
    if pred_lines[0] != gold_lines[0]:
        return 0.0
    pred_lines, gold_lines = pred_lines[1:], gold_lines[1:]
    idx = -1
    for p, g in zip(pred_lines, gold_lines):
        idx += 1
        if p == g:
            continue
        if "|- Try" in g and p.split("=")[0] == g.split("=")[0] and \
                ("drop this branch" in p) == ("drop this branch" in g):
            continue
        break
    return max(idx, 0) / len(gold_lines) if gold_lines else 0.0


def eval_countdown(output: str, reference: str, nums: list[int], target: int) -> dict[str, float]:
    solution = _between(output, "Solution")
    if solution is not None and countdown_solution_correct(nums, target, solution):
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}
    extraction = float(solution is not None)
    if "# Search Procedure" not in output:
        return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": extraction}
    pred = output.split("# Search Procedure")[-1].strip()
    gold = reference.split("# Search Procedure")[-1].split("Now we have found the target")[0].strip()
    return {"accuracy": 0.0, "partial_accuracy": _procedure_progress(pred, gold), "extraction_rate": extraction}


# ---- html to tsv ----

def _cell(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
    return text.replace(" ", "")


def _tsv_rows(text: str) -> tuple[int, list[tuple[str, ...]]]:
    data = list(csv.reader(text.strip().split("\n"), delimiter="\t"))
    header, rows = data[0], data[1:]
    if len(rows[-1]) != len(header):  # a last line that is not a row: an end marker or a cut-off line
        rows = rows[:-1]
    rows = [r if len(r) == len(header) else ["N/A"] * len(header) for r in rows]
    return len(header), [tuple(_cell(c) for c in r) for r in rows]


def eval_html_to_tsv(output: str, reference: str) -> dict[str, float]:
    match = re.search(r"```tsv([\s\S]*)```", output)
    table = match.group(1).strip() if match else (output.split("```tsv")[1] if "```tsv" in output else output).strip()
    try:
        gold_width, gold = _tsv_rows(reference)
        pred_width, pred = _tsv_rows(table)
        if gold_width != pred_width:
            raise ValueError("column counts differ")
        precision = sum(r in gold for r in pred) / len(pred)
        recall = sum(r in pred for r in gold) / len(gold)
    except (ValueError, IndexError, ZeroDivisionError, csv.Error):
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "extraction_rate": 0.0}
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"f1": f1, "precision": precision, "recall": recall, "extraction_rate": 1.0}


# ---- pseudocode to code ----

def eval_pseudo_to_code(output: str, testcases: list, timeout_s: float = 10.0) -> dict[str, float]:
    match = re.search(r"```cpp([\s\S]*)```", re.sub(r"```c\+\+", "```cpp", output))
    if match is None:
        return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}
    compiler = shutil.which("g++")
    if compiler is None:
        raise ValueError("LongProc pseudo_to_code needs g++ on PATH to run the generated programs")
    passed = True
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "main.cpp", Path(tmp) / "main"
        source.write_text(match.group(1))
        try:
            built = subprocess.run([compiler, "-O2", "-std=c++17", "-o", str(binary), str(source)],
                                   capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            built = None
        if built is None or built.returncode != 0:
            passed = False
        for case_input, case_output in testcases if passed else []:
            try:
                run = subprocess.run([str(binary)], input="\n".join(case_input) + "\n", capture_output=True,
                                     text=True, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                passed = False
                break
            got = [line.rstrip() for line in run.stdout.rstrip().split("\n")]
            want = [line.rstrip() for line in "\n".join(case_output).rstrip().split("\n")]
            if run.returncode != 0 or got != want:
                passed = False
                break
    return {"accuracy": float(passed), "partial_accuracy": float(passed), "extraction_rate": 1.0}


# ---- the benchmark ----

def _items(task: str, rows: list[dict[str, Any]], root: Path) -> list[tuple[dict[str, Any], str]]:
    """(prompt fields, reference output) per row, as LongProc's loaders build them."""
    items = []
    for row in rows:
        if task == "path_traversal":
            items.append(({"city_context": row["context_nl"], "src_city": row["question_repr"][0],
                           "dst_city": row["question_repr"][1]}, row["answer_nl"]))
        elif task == "tom_tracking":
            items.append(({"story_components": row.get("story_components"), "story": row["story"],
                           "question": row["question"]}, row["solution"]))
        elif task == "countdown":
            items.append(({"nums": row["nums"], "target": row["target"]},
                          countdown_procedure(list(row["nums"]), row["target"])[1]))
        elif task == "html_to_tsv":
            items.append(({"html_str": _html_page(root, row["html_path"]), "task_topic": row["task_topic"],
                           "task_description": row["task_description"], "tsv_header": row["tsv_header"],
                           "filtering_instruction": row["filtering_instruction"]}, row["gt"]))
        elif task == "pseudo_to_code":
            items.append(({"pseudocode": "\n".join(row["pseudocode_lines"]), "testcases": row["testcases"],
                           "problem_id": row["problem_id"]}, "\n".join(row["code_lines"])))
    return items


def _html_page(root: Path, html_path: str) -> str:
    relative = html_path.removeprefix("./")
    for candidate in (root / relative, root / "data" / relative, root / "data" / "html_to_tsv" / relative,
                      root / "data" / "html_to_tsv" / "webpage" / Path(relative).name):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    raise ValueError(f"LongProc html page {html_path!r} not found under {root}")


@register
class LongProc(Benchmark):
    name = "longproc"
    dataset = "github:princeton-pli/LongProc"
    revision = "78e873a"
    settings = GenerationSettings(max_new_tokens=3072)  # per file: MAX_NEW_TOKENS by output length

    def __init__(self):
        self.subsets = list(SUBSETS)

    def configure(self, subset=None, **options) -> None:
        self.subsets = option_list(subset, SUBSETS, "LongProc task")
        super().configure(**options)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        import yaml

        data_dir = Path(data_dir)
        if any(s.startswith("pseudo_to_code") for s in self.subsets) and shutil.which("g++") is None:
            raise ValueError("LongProc pseudo_to_code needs g++ on PATH; install it or leave it out with --subset")
        samples = []
        for subset in self.subsets:
            task, length = subset.rsplit("_", 1)
            path = data_files(data_dir, f"data/{task}/{subset}.json")[0]
            template = yaml.safe_load((path.parent / "prompts.yaml").read_text(encoding="utf-8"))["USER_PROMPT"]
            if task == "countdown":
                template = template.replace("{demonstration}", countdown_demonstration().replace("{", "{{")
                                            .replace("}", "}}"))
            rows = json.loads(path.read_text(encoding="utf-8"))[:ITEMS_PER_FILE]
            rows = rows[:limit] if limit is not None else rows
            for i, (fields, reference) in enumerate(_items(task, rows, data_dir)):
                samples.append(Sample(
                    id=f"{subset}/{i}", prompt=template.format(**fields), references=[reference], category=subset,
                    meta={"task": task, "max_new_tokens": MAX_NEW_TOKENS[length],
                          **{k: fields[k] for k in ("nums", "target", "testcases") if k in fields}},
                ))
        return samples

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        task, reference = sample.meta["task"], sample.references[0]
        if task == "path_traversal":
            result = eval_path_traversal(output, reference)
        elif task == "tom_tracking":
            result = eval_tom_tracking(output, reference)
        elif task == "countdown":
            result = eval_countdown(output, reference, sample.meta["nums"], sample.meta["target"])
        elif task == "html_to_tsv":
            result = eval_html_to_tsv(output, reference)
            return {"score": result["f1"], "extracted": None, **result}
        else:
            result = eval_pseudo_to_code(output, sample.meta["testcases"])
        return {"score": result["accuracy"], "extracted": None, **result}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("accuracy", "partial_accuracy", "extraction_rate", "f1", "precision", "recall")
        sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            for key in keys:
                if key in row:
                    sums[row["category"]][key].append(row[key])
        return {"longproc": {task: {k: sum(v) / len(v) for k, v in ms.items()} for task, ms in sorted(sums.items())}}
