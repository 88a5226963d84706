"""Scorers on hand-computed cases: math equivalence, LongBench metrics, SCBench and LongProc task checks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from trimkv.eval import metrics
from trimkv.eval.longbench_v2 import extract_choice
from trimkv.eval.longproc import (
    countdown_procedure,
    eval_countdown,
    eval_html_to_tsv,
    eval_path_traversal,
    eval_tom_tracking,
    eval_travel_planning,
    parse_travel_plan,
    travel_plan_procedure,
)
from trimkv.eval.mathgrade import extract_boxed, score_in_processes, score_math
from trimkv.eval.scbench import _choice_correct, _math_find, repoqa_pass

# ---- math ----

EQUIVALENT = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),  # fraction vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac12}", "1/2"),  # LaTeX shorthand vs plain
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # symbolic simplification
    ("\\boxed{1,500}", "1500"),  # thousands separator (GSM8K golds drop commas)
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}"),
    ("\\boxed{3} is wrong, so \\boxed{4}", "4"),  # the last box counts
]


@pytest.mark.parametrize("output,gold", EQUIVALENT)
def test_math_accepts_equivalent_forms(output, gold):
    assert score_math(output, gold)["score"] == 1.0


@pytest.mark.parametrize("output,gold", [("\\boxed{3}", "4"), ("\\boxed{0.333}", "\\frac{1}{3}"),
                                         ("\\boxed{\\frac{1}{2}}", "2")])
def test_math_rejects_wrong_answers(output, gold):
    assert score_math(output, gold)["score"] == 0.0


def test_math_rejects_unboxed_answers():
    result = score_math("The final answer is 4.", "4")
    assert result == {"score": 0.0, "extracted": None}


def test_boxed_extraction_balances_braces():
    assert extract_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{unclosed") is None


def test_math_scoring_off_the_main_thread_does_not_use_signals():
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=score_math("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert result["r"]["score"] == 1.0


def test_math_scoring_in_worker_processes():
    scores = score_in_processes(["\\boxed{0.5}", "\\boxed{3}"], ["\\frac{1}{2}", "4"], workers=2)
    assert [s["score"] for s in scores] == [1.0, 0.0]


# ---- LongBench metrics (worked examples) ----

def test_qa_f1_worked_example():
    # "the ada lovelace lab" -> [ada, lovelace, lab] vs [ada, lovelace]: P = 2/3, R = 1, F1 = 0.8
    assert metrics.qa_f1("The Ada Lovelace lab.", "Ada Lovelace") == pytest.approx(0.8)
    assert metrics.qa_f1("Charles Babbage", "Ada Lovelace") == 0.0


def test_rouge_l_worked_example():
    # LCS(the cat sat on the mat, the cat is on the mat) = the cat on the mat = 5 of 6 tokens each side
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("", "anything") == 0.0


def test_chinese_metrics():
    assert metrics.qa_f1_zh("张三。", "张三") == 1.0
    assert metrics.char_f1_zh("张三丰", "张三") == pytest.approx(0.8)  # P = 2/3, R = 1
    assert metrics.rouge_zh("会议讨论了预算", "会议讨论了预算") == pytest.approx(1.0)


def test_classification_retrieval_count_and_code():
    classes = ["City", "Individual", "Country"]
    assert metrics.classification("City", "City", classes) == 1.0
    assert metrics.classification("City or Country", "City", classes) == 0.5
    assert metrics.classification("nothing", "City", classes) == 0.0
    assert metrics.retrieval("Paragraph 2", "Paragraph 2") == 1.0
    assert metrics.retrieval("Paragraph 2 or 3", "Paragraph 2") == 0.5
    assert metrics.retrieval_zh("段落5", "段落5") == 1.0
    assert metrics.count("There are 2 unique paragraphs", "2") == 1.0
    assert metrics.code_sim("\n# a comment\n    return a + b\n", "    return a + b") == 1.0
    # Indel similarity: "return a+b" (10) vs "return a + b" (12), LCS 10: 2*10/22 = 90.9 -> 91
    assert metrics.code_sim("return a+b", "return a + b") == 0.91


def test_longbench_v2_choice_extraction():
    assert extract_choice("**The correct answer is (C)**") == "C"
    assert extract_choice("The correct answer is B.") == "B"
    assert extract_choice("I think C") is None


# ---- SCBench ----

def test_scbench_task_checks():
    assert _choice_correct("B. Paris", ["Paris", "B"])
    assert _choice_correct("I believe the answer is B", ["Paris", "B"])
    assert not _choice_correct("A", ["Paris", "B"])
    assert _math_find("It is 17.", 17) and not _math_find("It is 3.", 17)
    assert _math_find("2.5 exactly", 2.5)
    add, mul = "def add(a, b):\n    return a + b", "def mul(a, b):\n    result = a * b\n    return result"
    needles = [("add", add), ("mul", mul)]
    assert repoqa_pass(f"```python\n{mul}\n```", "mul", needles)[0]
    assert not repoqa_pass(f"```python\n{add}\n```", "mul", needles)[0]


# ---- LongProc ----

def test_path_traversal_exact_and_partial():
    gold = "From A, take a bus to B.\nFrom B, take a train to C.\nFrom C, take a car to D."
    assert eval_path_traversal(f"<Route>\n{gold}\n</Route>", gold)["accuracy"] == 1.0
    wrong = "From A, take a bus to B.\nFrom B, take a bus to C."
    result = eval_path_traversal(f"<Route>{wrong}</Route>", gold)
    assert result["accuracy"] == 0.0 and result["partial_accuracy"] == pytest.approx(2 / 3)  # LongProc counts i + 1
    assert eval_path_traversal("no tags", gold)["extraction_rate"] == 0.0


def test_tom_tracking_normalizes_and_counts_steps():
    gold = "- Step 0: Ann thinks the ball is in the box.\n- Step 1: Ann believes the ball is in the box."
    assert eval_tom_tracking("- Step 0: ann thinks ball in box\n- Step 1: Ann believes the ball is in the box",
                             gold)["accuracy"] == 1.0
    result = eval_tom_tracking("- Step 0: Ann thinks the ball is in the box.\n- Step 1: Ann thinks it is in the bag.", gold)
    assert result["accuracy"] == 0.0 and result["partial_accuracy"] == 0.5


def test_countdown_solution_and_procedure():
    _, reference = countdown_procedure([21, 16, 17, 26], 46)
    assert eval_countdown(reference, reference, [21, 16, 17, 26], 46)["accuracy"] == 1.0
    wrong = reference.replace("<Solution>\n21 + 16 = 37", "<Solution>\n21 + 17 = 38")
    result = eval_countdown(wrong, reference, [21, 16, 17, 26], 46)
    assert result["accuracy"] == 0.0 and 0.0 < result["partial_accuracy"] < 1.0


def test_html_to_tsv_row_precision_recall():
    gold = "Product\tPrice\nTea\t$3\nCoffee\t$4"
    assert eval_html_to_tsv("```tsv\nProduct\tPrice\nCoffee\t$4\nTea\t$3\n```", gold)["f1"] == 1.0
    half = eval_html_to_tsv("```tsv\nProduct\tPrice\nTea\t$3\nMilk\t$2\n```", gold)
    assert half["precision"] == 0.5 and half["recall"] == 0.5 and half["f1"] == 0.5
    assert eval_html_to_tsv("no table", gold)["extraction_rate"] == 0.0


# travel planning, on the fixture's Lisbon problem: Lisbon 4 days, Prague 5 (fixed on days 4-8), Vienna 5; flights
# Lisbon -> Prague -> Vienna -> Lisbon. Its reference procedure has 52 non-empty lines once LongProc drops the
# "Output the plan in the required format:" line: <Solving Procedure> and 9 requirement lines (0-9), the search
# (10-43), </Solving Procedure> (44), <Plan> (45), the five plan lines (46-50), </Plan> (51).

TRIPS = Path(__file__).parent / "fixtures" / "longproc" / "data" / "travel_planning" / "travel_planning_all.json"
GOLD_PLAN = ("**Day 1-4:** Arriving in Lisbon and visit Lisbon for 4 days.\n**Day 4:** Fly from Lisbon to Prague.\n"
             "**Day 4-8:** Visit Prague for 5 days.\n**Day 8:** Fly from Prague to Vienna.\n"
             "**Day 8-12:** Visit Vienna for 5 days.")


@pytest.fixture(scope="module")
def lisbon():
    item = json.loads(TRIPS.read_text())[0]
    stops, reference = travel_plan_procedure(item)
    assert stops == [("Lisbon", 1, 4), ("Prague", 4, 8), ("Vienna", 8, 12)]
    assert len([line for line in reference.replace("Output the plan in the required format:", "").split("\n")
                if line.strip()]) == 52
    return reference, lambda output: eval_travel_planning(output, reference, item["ground_truth_cities"],
                                                          item["ground_truth_durations"])


def test_travel_plan_procedure_searches_day_by_day():
    riga = json.loads(TRIPS.read_text())[2]  # Milan fixed on days 6-11; the first two day-1 options fail
    stops, text = travel_plan_procedure(riga)
    assert stops == [("Riga", 1, 4), ("Oslo", 4, 6), ("Milan", 6, 11), ("Athens", 11, 12)]
    lines = text.split("\n")
    assert lines[:3] == ["<Solving Procedure>", ("Read the requirements and identify the cities that have fixed "
                         "schedules and the cities that need to be arranged."), "* City: Oslo, Duration: 3 days."]
    assert "* City: Milan, Duration: 6 days, Fixed Schedule: Day 6 - 11." in lines
    assert "* City: Milan, Fixed Schedule: Day 6 - 11." in lines
    # Oslo (1-3) then Riga (3-6): no flight Riga -> Milan on the fixed day 6; indent = 2 per planned city (+1 options)
    riga_to_milan = lines.index("     |- Check for direct flight from Riga to Milan.")
    assert lines[riga_to_milan + 1] == "     |- No. Drop this branch."
    assert ("     |- The departure day of Oslo is Day 7. The arrival day of Milan is Day 6. Day 7 is later than (>) "
            "Day 6. This arrangement is incompatible. Drop this branch.") in lines  # Athens, Riga, then Oslo 5-7
    assert "        |- All 4 cities are arranged. Complete plan is found!" in lines
    assert text.endswith("<Plan>\n**Day 1-4:** Arriving in Riga and visit Riga for 4 days.\n**Day 4:** Fly from Riga "
                         "to Oslo.\n**Day 4-6:** Visit Oslo for 3 days.\n**Day 6:** Fly from Oslo to Milan.\n"
                         "**Day 6-11:** Visit Milan for 6 days.\n**Day 11:** Fly from Milan to Athens.\n"
                         "**Day 11-12:** Visit Athens for 2 days.\n</Plan>")


def test_travel_plan_parser_reads_flights_and_stops_at_the_last_day():
    assert parse_travel_plan(GOLD_PLAN) == [("Lisbon", 4), ("Prague", 5), ("Vienna", 5)]
    # stays come from the flight days, not from the "for N days" words
    assert parse_travel_plan(GOLD_PLAN.replace("Visit Prague for 5 days", "Visit Prague for 9 days")) == \
        [("Lisbon", 4), ("Prague", 5), ("Vienna", 5)]
    # with the "... European cities for 12 days" header, reading stops at the range ending on day 12
    alternative = "\nOr:\n**Day 1-5:** Visit Vienna.\n**Day 5:** Fly from Vienna to Lisbon."
    header = "Here is the trip plan for visiting the 3 European cities for 12 days:\n"
    assert parse_travel_plan(header + GOLD_PLAN + alternative) == [("Lisbon", 4), ("Prague", 5), ("Vienna", 5)]
    # without it the alternative's flight is read too: flight days 4, 8, 5 and last day 5 give Vienna 5 - 8 + 1 days
    assert parse_travel_plan(GOLD_PLAN + alternative) == [("Lisbon", 4), ("Prague", 5), ("Vienna", -2), ("Lisbon", 1)]
    assert parse_travel_plan("Lisbon, then Prague, then Vienna.") == []


def test_travel_planning_correct_plan(lisbon):
    reference, score = lisbon
    perfect = {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}
    assert score(reference) == perfect
    assert score(f"<Plan>\n{GOLD_PLAN}\n</Plan>") == perfect  # the plan alone is enough for accuracy
    # LongProc compares the first len(gold) stops only: an extra stop after the gold plan is not penalized
    assert score(f"<Plan>\n{GOLD_PLAN}\n**Day 12:** Fly from Vienna to Lisbon.\n**Day 12-13:** Visit Lisbon.\n</Plan>")\
        == perfect


def test_travel_planning_plan_that_breaks_a_constraint(lisbon):
    reference, score = lisbon
    # Vienna before Prague: misses Prague's fixed days 4-8 and takes a flight Lisbon -> Vienna that does not exist
    broken = ("**Day 1-4:** Arriving in Lisbon and visit Lisbon for 4 days.\n**Day 4:** Fly from Lisbon to Vienna.\n"
              "**Day 4-8:** Visit Vienna for 5 days.\n**Day 8:** Fly from Vienna to Prague.\n"
              "**Day 8-12:** Visit Prague for 5 days.")
    assert parse_travel_plan(broken) == [("Lisbon", 4), ("Vienna", 5), ("Prague", 5)]
    # the plan alone: no procedure, so the trace fails on its first line ("<Plan>" vs "<Solving Procedure>")
    assert score(f"<Plan>\n{broken}\n</Plan>") == {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 1.0}
    # the right procedure, then the broken plan: lines 0-46 match, line 47 (the first flight) does not
    assert score(reference.replace(GOLD_PLAN, broken)) == {"accuracy": 0.0, "partial_accuracy": 47 / 52,
                                                           "extraction_rate": 1.0}


def test_travel_planning_partially_correct(lisbon):
    reference, score = lisbon
    # right cities, but the last stay runs to day 13: Vienna stays 6 days; the trace breaks at line 50
    assert score(reference.replace("**Day 8-12:**", "**Day 8-13:**")) == {"accuracy": 0.0, "partial_accuracy": 50 / 52,
                                                                       "extraction_rate": 1.0}
    # the search wrongly accepts Vienna on day 1 (line 17) and the output is cut off before any plan
    lines = reference.split("\n")
    wrong = next(i for i, line in enumerate(lines) if "departure day of Vienna is Day 5" in line)
    cut = "\n".join(lines[:wrong] + [" |- The departure day of Vienna is Day 5. This arrangement is compatible."])
    assert score(cut) == {"accuracy": 0.0, "partial_accuracy": 17 / 52, "extraction_rate": 0.0}
    # the search right to its end but cut off before </Solving Procedure>: LongProc's count gives 44 - 1 lines
    end = next(i for i, line in enumerate(lines) if "All 3 cities are arranged" in line)
    assert score("\n".join(lines[:end + 1])) == {"accuracy": 0.0, "partial_accuracy": 43 / 52, "extraction_rate": 0.0}


def test_travel_planning_unparseable_output(lisbon):
    _, score = lisbon
    assert score("I could not find a plan.") == {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}
    assert score("") == {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}
    # tags but no day ranges or flights: extracted, nothing parsed
    assert score("<Plan>Lisbon, then Prague, then Vienna.</Plan>") == {"accuracy": 0.0, "partial_accuracy": 0.0,
                                                                      "extraction_rate": 1.0}
