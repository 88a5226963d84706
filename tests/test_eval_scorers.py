"""Scorers on hand-computed cases: math equivalence, LongBench metrics, SCBench and LongProc task checks."""

from __future__ import annotations

import threading

import pytest

from trimkv.eval import metrics
from trimkv.eval.longbench_v2 import extract_choice
from trimkv.eval.longproc import (
    countdown_procedure,
    eval_countdown,
    eval_html_to_tsv,
    eval_path_traversal,
    eval_tom_tracking,
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
