"""LongProc (princeton-pli/LongProc): long procedural generation — the output, not the input, is long.

Source: not on the Hugging Face Hub; the data step downloads the GitHub repository at a pinned commit
and keeps its `data/` folder: `data/<task>/<task>_<len>.json` (JSON arrays), `data/<task>/prompts.yaml`
(the `USER_PROMPT` template, read from the data, not copied here) and the html pages of html_to_tsv.
travel_planning has one file for both lengths, `data/travel_planning/travel_planning_all.json`, split
as LongProc does by the reference's `estimated_output_tokens` (2k: [0, 2048), 8k: [4096, 8192)), and
its worked examples in `travel_planning_icl_examples.json`.

Tasks (`--subset`, default all of these): path_traversal, tom_tracking, countdown, html_to_tsv at
0.5k / 2k / 8k output tokens, pseudo_to_code at 0.5k / 2k, travel_planning at 2k / 8k. Settings as
HELMET's LongProc configs: chat template, greedy, 100 items of each file (HELMET's: shuffled with seed 42,
the first 100), max new tokens 1024 / 3072 / 10240 for 0.5k / 2k / 8k.

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
  compared line by line without trailing spaces); needs g++ on PATH;
- travel_planning: the plan between the first <Plan> and </Plan> is read as Natural Plan's parser
  reads it (cities from the "Day N: Fly from X to Y" lines, stays from the flight days) and must start
  with the gold (city, days) stops. As in LongProc, the constraints themselves are not checked: a plan
  is right when it is the gold plan. partial = how far the <Solving Procedure> follows the reference
  search line by line (normalized, the reference line contained in the output line), LongProc's
  count. The reference, and the prompt's demonstration built from the ICL file, are the day-by-day
  depth-first search the prompt describes (`travel_plan_procedure`); loading checks that it finds
  each row's `ground_truth_plan`, as LongProc does.
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

import numpy as np

from trimkv.eval.base import Benchmark, GenerationSettings, Sample, data_files, option_list, register

LENGTHS = {"path_traversal": ("0.5k", "2k", "8k"), "tom_tracking": ("0.5k", "2k", "8k"),
           "countdown": ("0.5k", "2k", "8k"), "html_to_tsv": ("0.5k", "2k", "8k"), "pseudo_to_code": ("0.5k", "2k"),
           "travel_planning": ("2k", "8k")}
SUBSETS = tuple(f"{task}_{length}" for task, lengths in LENGTHS.items() for length in lengths)
MAX_NEW_TOKENS = {"0.5k": 1024, "2k": 3072, "8k": 10240}
ITEMS_PER_FILE = 100
SHUFFLE_SEED = 42  # HELMET's default seed


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

def _plain_words(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (LongProc's line normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _cell(text: str) -> str:
    return _plain_words(text).replace(" ", "")


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


# ---- travel planning ----

_TRIP_START = "the starting point"  # where the first flight leaves from: always allowed
_TRIP_TOKENS = {"2k": (0, 2048), "8k": (4096, 8192)}  # estimated_output_tokens range per file, LongProc's split


def _city_list(names) -> str:
    return "[" + ", ".join(names) + "]"


def travel_plan_procedure(item: dict[str, Any]) -> tuple[list[tuple[str, int, int]], str]:
    """The solving procedure LongProc's travel_planning prompt asks for, written out for one problem.

    A depth-first search over days: from day 1, a city pinned by a fixed schedule to arrive that day is
    the only option, otherwise every city still to arrange is tried in the order of the constraints;
    an option is kept when a direct flight goes from the last city to it (the first city needs none) and
    it leaves no later than the arrival day of the next fixed schedule; the next city arrives on the day
    the previous one is left. `item` has LongProc's fields num_cities, constraints (duration and fixed
    entries, a city's fixed entry right after its duration entry) and connected_cities (one-way
    [from, to] pairs). Returns the stops (city, arrival day, departure day) and the text: the
    <Solving Procedure> log, then the <Plan>.
    """
    constraints = item["constraints"]
    flights = {tuple(pair) for pair in item["connected_cities"]}
    fixed = sorted((c for c in constraints if c["type"] == "fixed"), key=lambda c: c["start_day"])
    pinned_cities = {c["city"] for c in fixed}
    to_arrange = [(c["city"], c["num_days"]) for c in constraints
                  if c["type"] == "duration" and c["city"] not in pinned_cities]

    log = [("Read the requirements and identify the cities that have fixed schedules and the cities that need "
            "to be arranged.")]
    for k, c in enumerate(constraints):
        if c["type"] != "duration":
            continue
        line = f"* City: {c['city']}, Duration: {c['num_days']} days"
        if c["city"] in pinned_cities:
            window = constraints[k + 1] if k + 1 < len(constraints) else {}
            if window.get("type") != "fixed" or window.get("city") != c["city"]:
                raise ValueError(f"travel_planning {item.get('id')}: the fixed schedule of {c['city']} must follow "
                                 "its duration constraint")
            line += f", Fixed Schedule: Day {window['start_day']} - {window['end_day']}"
        log.append(line + ".")
    log.append("")
    if fixed:
        log.append("Cities that have fixed schedules (sorted by their arrival days):")
        log.extend(f"* City: {c['city']}, Fixed Schedule: Day {c['start_day']} - {c['end_day']}." for c in fixed)
    else:
        log.append("Cities that have fixed schedules: None.")
    log.append("")
    if to_arrange:
        log.append("Cities needing arrangement:")
        log.extend(f"* City: {city}, Duration: {days} days." for city, days in to_arrange)
    else:
        log.append("Cities needing arrangement: None.")
    log.append("")

    stops: list[tuple[str, int, int]] = []

    def search(day: int, open_cities: list[tuple[str, int]]) -> bool:
        here = _indent(2 * len(stops))
        log.append(f"{here}Current day: {day}. Current plan: {_city_list(s[0] for s in stops)}.")
        if len(stops) == item["num_cities"]:
            log.append(f"{here}All {item['num_cities']} cities are arranged. Complete plan is found!")
            return True
        log.append(f"{here}Check whether the city with an arrival day of Day {day} - is fixed.")
        pinned = next((c for c in fixed if c["start_day"] == day), None)
        if pinned is not None:
            log.append(f"{here}Yes. The city with an arrival day of Day {day} - is fixed: {pinned['city']}.")
            options = [(pinned["city"], pinned["end_day"] - pinned["start_day"] + 1)]
        else:
            log.append(f"{here}No. Consider possible options from cities needing arrangement: "
                       f"{_city_list(city for city, _ in open_cities)} and explore these options in order.")
            options = open_cities
        origin = stops[-1][0] if stops else _TRIP_START
        upcoming = next((c for c in fixed if c["start_day"] > day), None)
        inner = _indent(2 * len(stops) + 1)
        for city, days in options:
            leave = day + days - 1
            log.append(f"{inner}Try arranging to visit {city} from Day {day}. Duration: {days} days. "
                       f"Schedule: Day {day} - {leave}.")
            log.append(f"{inner}Check for direct flight from {origin} to {city}.")
            if stops and (origin, city) not in flights:
                log.append(f"{inner}No. Drop this branch.")
                continue
            log.append(f"{inner}Yes.")
            check = f"{inner}Check whether this arrangement is compatible with the next fixed schedule after Day {day}:"
            if upcoming is None:
                log.append(f"{check} None.")
                log.append(f"{inner}No following fixed schedules. This arrangement is compatible.")
            else:
                arrive = upcoming["start_day"]
                log.append(f"{check} {upcoming['city']} (Day {arrive} - {upcoming['end_day']}).")
                late = leave > arrive
                log.append(f"{inner}The departure day of {city} is Day {leave}. The arrival day of {upcoming['city']} "
                           f"is Day {arrive}. Day {leave} is {'later than (>)' if late else 'not later than (<=)'} "
                           f"Day {arrive}. This arrangement is "
                           + ("incompatible. Drop this branch." if late else "compatible."))
                if late:
                    continue
            log.append(f"{inner}This arrangement is feasible for now. Continue to arrange the rest of the plan.")
            stops.append((city, day, leave))
            if search(leave, [o for o in open_cities if o[0] != city]):
                return True
            stops.pop()
        log.append(f"{inner}Fail to arrange any option on day {day} in the current arrangement. Drop this branch.")
        return False

    if not search(1, to_arrange):
        raise ValueError(f"travel_planning {item.get('id')}: no plan satisfies the constraints")
    text = ("<Solving Procedure>\n" + "\n".join(log) + "\n</Solving Procedure>\n\n"
            f"Output the plan in the required format:\n<Plan>\n{travel_plan_text(stops)}\n</Plan>")
    return stops, text


def travel_plan_text(stops: list[tuple[str, int, int]]) -> str:
    """The plan lines of LongProc's format: a "**Day a-b:**" stay per city, a "**Day b:** Fly" line between."""
    lines = []
    for k, (city, arrive, leave) in enumerate(stops):
        days = leave - arrive + 1
        stay = f"Arriving in {city} and visit {city} for {days} days." if k == 0 else f"Visit {city} for {days} days."
        lines.append(f"**Day {arrive}-{leave}:** {stay}")
        if k + 1 < len(stops):
            lines.append(f"**Day {leave}:** Fly from {city} to {stops[k + 1][0]}.")
    return "\n".join(lines)


def travel_planning_demonstration(examples: list[dict[str, Any]]) -> str:
    """The prompt's worked examples: each problem of the ICL file with its solving procedure and plan."""
    return "\n\n".join(f"# Example\n{ex['disambig_question_text']}\n\n{travel_plan_procedure(ex)[1]}"
                       for ex in examples)


def parse_travel_plan(text: str) -> list[tuple[str, int]]:
    """(city, days) per stop, read the way LongProc reads a plan (Natural Plan's parser): the cities
    from the flight lines ("... Day N ... from X to Y", X then each Y), the stays from the flight days
    (a city flown into on day a and left on day b stays b - a + 1 days; the first arrives on day 1, the
    last stays until the end of the last "a-b" day range). Reading stops at the range that ends on the
    total given by a "European cities for N days" line, if any. [] when there is no flight or range."""
    total = None
    ranges: list[int] = []  # the end day of each "a-b" range
    flights: list[tuple[int, str, str]] = []
    for line in text.split("\n"):
        days_line = re.search(r"European cities for (\d+) days", line)
        if days_line:
            total = int(days_line.group(1))
        day_range = re.search(r"\d+-(\d+)", line)
        if day_range:
            ranges.append(int(day_range.group(1)))
            if ranges[-1] == total:
                break
        flight = re.search(r".*Day (\d+).*from (\w+) to (\w+)", line)
        if flight:
            flights.append((int(flight.group(1)), flight.group(2), flight.group(3)))
    if not ranges or not flights:
        return []
    cities = [flights[0][1]] + [to for _, _, to in flights]
    bounds = [1] + [day for day, _, _ in flights] + [ranges[-1]]
    return [(city, bounds[k + 1] - bounds[k] + 1) for k, city in enumerate(cities)]


def _trace_progress(output: str, reference: str) -> float:
    """How far the output's solving procedure follows the reference, LongProc's count: non-empty lines
    compared in order, a line matching when the normalized reference line is contained in the normalized
    output line; the score is the index of the first mismatch over the reference lines (a trace that
    matches to its end scores one line less than its length)."""
    marker, tag = "Output the plan in the required format:", "<Solving Procedure>"
    output, reference = output.replace(marker, ""), reference.replace(marker, "")
    reference = tag + reference.split(tag)[1]
    if tag in output:
        output = tag + output.split(tag)[1]  # up to a second tag, if the model wrote one
    pred = [line.rstrip() for line in output.strip().split("\n") if line.strip()]
    gold = [line.rstrip() for line in reference.strip().split("\n") if line.strip()]
    pairs = min(len(pred), len(gold))
    first_miss = next((k for k in range(pairs) if _plain_words(gold[k]) not in _plain_words(pred[k])), None)
    return (first_miss if first_miss is not None else max(pairs - 1, 0)) / len(gold)


def eval_travel_planning(output: str, reference: str, cities: str, durations: str) -> dict[str, float]:
    """`cities` / `durations`: the gold plan as LongProc stores it, "A**B**C" and "5**5**6"."""
    plan = _between(output, "Plan")
    gold = list(zip([c for c in cities.split("**") if c], [int(d) for d in durations.split("**") if d]))
    parsed = parse_travel_plan(plan) if plan is not None else []
    # LongProc's exact match: the first len(gold) stops equal the gold ones (a longer plan is not penalized)
    if len(parsed) >= len(gold) and parsed[:len(gold)] == gold:
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}
    return {"accuracy": 0.0, "partial_accuracy": _trace_progress(output, reference),
            "extraction_rate": float(plan is not None)}


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
        elif task == "travel_planning":
            stops, reference = travel_plan_procedure(row)
            gold_plan = row["ground_truth_plan"].split("\n\n")[1].strip()  # after the "Here is the trip plan" line
            if travel_plan_text(stops) != gold_plan:  # LongProc checks the same
                raise ValueError(f"LongProc travel_planning {row['id']}: the searched plan differs from "
                                 "ground_truth_plan")
            items.append(({"problem": row["disambig_question_text"], "cities": row["ground_truth_cities"],
                           "durations": row["ground_truth_durations"]}, reference))
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
            if task == "travel_planning":  # one file for both lengths, split by the reference's estimated length
                path = data_files(data_dir, "data/travel_planning/travel_planning_all.json")[0]
                low, high = _TRIP_TOKENS[length]
                rows = [r for r in json.loads(path.read_text(encoding="utf-8"))
                        if low <= r["estimated_output_tokens"] < high]
            else:
                path = data_files(data_dir, f"data/{task}/{subset}.json")[0]
                rows = json.loads(path.read_text(encoding="utf-8"))
            template = yaml.safe_load((path.parent / "prompts.yaml").read_text(encoding="utf-8"))["USER_PROMPT"]
            demonstration = None
            if task == "countdown":
                demonstration = countdown_demonstration()
            elif task == "travel_planning":
                examples = json.loads((path.parent / "travel_planning_icl_examples.json").read_text(encoding="utf-8"))
                demonstration = travel_planning_demonstration(examples)
            if demonstration is not None:
                template = template.replace("{demonstration}", demonstration.replace("{", "{{").replace("}", "}}"))
            # HELMET's 100: the file's items shuffled with seed 42 (datasets' shuffle = numpy's default_rng
            # permutation), then the first 100; ids keep each item's index in the file
            picked = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))[:ITEMS_PER_FILE].tolist()
            picked = picked[:limit] if limit is not None else picked
            for i, (fields, reference) in zip(picked, _items(task, [rows[i] for i in picked], data_dir)):
                samples.append(Sample(
                    id=f"{subset}/{i}", prompt=template.format(**fields), references=[reference], category=subset,
                    meta={"task": task, "max_new_tokens": MAX_NEW_TOKENS[length],
                          **{k: fields[k] for k in ("nums", "target", "testcases", "cities", "durations")
                             if k in fields}},
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
        elif task == "travel_planning":
            result = eval_travel_planning(output, reference, sample.meta["cities"], sample.meta["durations"])
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
