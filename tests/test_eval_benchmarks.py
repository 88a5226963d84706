"""Every benchmark on its fixture (tests/fixtures/<name>/, the dataset's real schema, our content):
it loads, renders a prompt with a chat template, and scores known outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_tiny_model, save_tiny_tokenizer

from trimkv.eval import BENCHMARKS, get_benchmark

FIXTURES = Path(__file__).parent / "fixtures"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    tok.chat_template = CHAT
    return tok


def load(name: str, **options):
    bench = get_benchmark(name)
    bench.configure(**options)
    return bench, bench.load(FIXTURES / name)


def test_every_paper_benchmark_is_registered():
    for name in ("gsm8k", "math500", "aime24", "longproc", "scbench", "longmemeval", "longbench", "longbench_v2"):
        assert name in BENCHMARKS
        bench = get_benchmark(name)
        assert bench.dataset and bench.revision and bench.settings.max_new_tokens > 0


def test_unknown_benchmark_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid benchmarks: .*gsm8k"):
        get_benchmark("nope")


def test_missing_data_says_how_to_fetch(tmp_path):
    with pytest.raises(ValueError, match="trimkv data fetch"):
        get_benchmark("gsm8k").load(tmp_path / "absent")


def test_gsm8k(tokenizer):
    bench, samples = load("gsm8k")
    assert [s.references for s in samples] == [["12"], ["1500"], ["4.5"]]
    assert bench.settings.samples == 8 and bench.settings.temperature == 0.6 and bench.thinking
    text = bench.render(samples[0], tokenizer, thinking=True)
    assert text.startswith("<|user|>\nYou are given a math problem.") and "Tom has 3 boxes" in text
    assert text.endswith("<|assistant|>\n") and "\\boxed{}" in text
    assert bench.score(samples[1], "1200 + 300 = \\boxed{1,500}")["score"] == 1.0
    assert bench.score(samples[2], "\\boxed{\\frac{9}{2}}")["score"] == 1.0
    assert bench.score(samples[0], "twelve")["score"] == 0.0


def test_math500(tokenizer):
    bench, samples = load("math500")
    assert samples[0].id == "test/prealgebra/1.json" and samples[0].category == "Prealgebra"
    assert "<think></think>" in bench.render(samples[0], tokenizer, thinking=False)
    assert bench.score(samples[0], "\\boxed{0.5}")["score"] == 1.0
    assert bench.score(samples[2], "\\boxed{\\sqrt{8}}")["score"] == 1.0
    assert bench.score(samples[1], "\\boxed{-3}")["score"] == 0.0


def test_aime24(tokenizer):
    bench, samples = load("aime24")
    assert bench.settings.samples == 64 and [s.id for s in samples] == ["60", "61"]
    assert bench.score(samples[1], "so \\boxed{9}")["score"] == 1.0
    assert bench.score(samples[0], "\\boxed{01}")["score"] == 1.0


def test_longbench(tokenizer):
    bench, samples = load("longbench", subset="hotpotqa,trec,passage_retrieval_en,lcc,multifieldqa_zh,gov_report,"
                                                 "passage_count,qasper_e")
    by_task = {s.category: s for s in samples}
    hotpot = by_task["hotpotqa"]
    assert hotpot.meta["max_new_tokens"] == 32 and bench.max_new_tokens(hotpot) == 32
    assert "Question: Who founded the lab?\nAnswer:" in hotpot.prompt
    assert bench.render(hotpot, tokenizer).startswith("<|user|>")
    assert bench.render(by_task["trec"], tokenizer) == by_task["trec"].prompt  # few-shot tasks: no chat template
    assert bench.score(hotpot, "Ada Lovelace")["score"] == 1.0
    assert bench.score(by_task["trec"], "\nCity\nType: Individual")["score"] == 1.0  # first line only
    assert bench.score(by_task["passage_retrieval_en"], "Paragraph 2")["score"] == 1.0
    assert bench.score(by_task["lcc"], "    return a + b\n")["score"] == 1.0
    assert bench.score(by_task["multifieldqa_zh"], "张三")["score"] == 1.0
    assert bench.score(by_task["passage_count"], "2")["score"] == 1.0
    assert 0 < bench.score(by_task["gov_report"], "The agency found waste.")["score"] < 1
    rows = [{"category": s.category, "score": 1.0, **bench.score(s, "yes")} for s in samples if s.category == "qasper_e"]
    summary = bench.aggregate(rows)
    assert set(summary["longbench_e_length_buckets_x100"]["qasper_e"]) == {"0-4k", "4-8k"}


def test_longbench_v2(tokenizer):
    bench, samples = load("longbench_v2")
    assert "(C) Clause 3" in samples[0].prompt and "the fee is {fixed}" in samples[0].prompt
    assert bench.render(samples[0], tokenizer).endswith("<|assistant|>\n<think></think>")  # thinking off by default
    assert bench.score(samples[0], "The correct answer is (C)")["score"] == 1.0
    assert bench.score(samples[1], "The correct answer is (C)")["score"] == 0.0
    rows = [{"category": s.category, **bench.score(s, o)} for s, o in zip(samples, ["(C)... The correct answer is (C)", "x"])]
    assert bench.aggregate(rows)["longbench_v2_x100"] == {"overall": 50.0, "easy": 100.0, "hard": 0.0, "short": 100.0,
                                                          "long": 0.0}


def test_scbench(tokenizer):
    bench, samples = load("scbench", subset="scbench_kv,scbench_choice_eng,scbench_mf,scbench_qa_eng,scbench_repoqa,"
                                             "scbench_summary_with_needles")
    assert bench.multi_turn
    kv = [s for s in samples if s.meta["conversation"] == "scbench_kv/0"]
    assert [s.meta["turn"] for s in kv] == [0, 1] and kv[0].meta["max_new_tokens"] == 150
    assert kv[0].prompt.startswith("Extract the value") and '"a1b2"' in kv[0].prompt
    follow = bench.follow_up(kv[1], kv[0], tokenizer)
    assert follow == "c3d4<|end|>\n<|user|>\n" + kv[1].prompt + "<|end|>\n<|assistant|>\n<think></think>"
    assert bench.score(kv[0], "c3d4")["score"] == 1.0 and bench.score(kv[1], "c3d4")["score"] == 0.0
    choice = [s for s in samples if s.category == "scbench_choice_eng"]
    assert choice[0].references == ["Paris", "B"] and bench.score(choice[0], "B")["score"] == 1.0
    mf = [s for s in samples if s.category == "scbench_mf"]
    assert mf[0].prompt.startswith("What is the largest number in the list?\n\n[5, 17, 3, 9]")
    assert bench.score(mf[0], "17")["score"] == 1.0 and bench.score(mf[1], "17")["score"] == 0.0
    qa = next(s for s in samples if s.category == "scbench_qa_eng")
    assert bench.score(qa, "It is Alice.")["score"] == 1.0
    repo = [s for s in samples if s.category == "scbench_repoqa"]
    assert bench.score(repo[1], "```python\n" + repo[1].references[0] + "\n```")["score"] == 1.0
    needles = [s for s in samples if s.category.startswith("scbench_summary_with_needles")]
    assert [s.category for s in needles] == ["scbench_summary_with_needles:scbench_summary",
                                             "scbench_summary_with_needles:scbench_passkey"]
    assert [s.meta["max_new_tokens"] for s in needles] == [800, 15]
    assert bench.score(needles[1], "The pass key is 7781.")["score"] == 1.0


def test_scbench_without_chat_template_appends_gold_and_query(tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path))
    bench, samples = load("scbench", subset="scbench_kv")
    assert bench.follow_up(samples[1], samples[0], plain) == "c3d4\n\n" + samples[1].prompt


def test_longproc(tokenizer):
    bench, samples = load("longproc", subset="path_traversal_0.5k,tom_tracking_0.5k,countdown_0.5k,html_to_tsv_0.5k,"
                                             "pseudo_to_code_0.5k")
    by_task = {s.meta["task"]: s for s in samples}
    assert all(s.meta["max_new_tokens"] == 1024 for s in samples)
    path = by_task["path_traversal"]
    assert "from Oslo to Rome" in path.prompt and bench.render(path, tokenizer).startswith("<|user|>")
    assert bench.score(path, f"<Route>\n{path.references[0]}\n</Route>")["score"] == 1.0
    tom = by_task["tom_tracking"]
    assert bench.score(tom, tom.references[0])["score"] == 1.0
    countdown = by_task["countdown"]
    assert "Numbers: [40, 19, 23, 7]" in countdown.prompt and "Numbers: [21, 16, 17, 26]" in countdown.prompt
    assert bench.score(countdown, countdown.references[0])["score"] == 1.0
    html = by_task["html_to_tsv"]
    assert "<li>Tea - $3</li>" in html.prompt
    assert bench.score(html, "```tsv\nProduct\tPrice\nTea\t$3\nCoffee\t$4\n```")["score"] == 1.0
    code = by_task["pseudo_to_code"]
    program = "```cpp\n#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<\"\\n\";}\n```"
    assert bench.score(code, program)["score"] == 1.0
    assert bench.score(code, program.replace("a+b", "a-b"))["score"] == 0.0


def test_longproc_travel_planning(tokenizer):
    bench, samples = load("longproc", subset="travel_planning_2k,travel_planning_8k")
    # one file for both lengths, split by estimated_output_tokens (850 -> 2k, 5200 -> 8k, 3000 -> neither)
    assert [(s.id, s.meta["cities"], s.meta["max_new_tokens"]) for s in samples] == [
        ("travel_planning_2k/0", "Lisbon**Prague**Vienna", 3072),
        ("travel_planning_8k/0", "Riga**Oslo**Milan**Athens", 10240)]
    lisbon = samples[0]
    # the template from prompts.yaml, the demonstration built from the ICL file, then the problem
    assert lisbon.prompt.startswith("Plan the trip by searching day by day")
    assert "# Example\nA week in 3 European cities" in lisbon.prompt
    assert " |- Check for direct flight from the starting point to Porto." in lisbon.prompt
    assert "<Plan>\n**Day 1-3:** Arriving in Valencia and visit Valencia for 3 days." in lisbon.prompt
    assert lisbon.prompt.endswith(
        "YOUR TASK:\nYou will spend 12 days touring 3 European cities, flying only direct. Vienna gets 5 days. "
        "Prague gets 5 days, and a concert there runs from day 4 to day 8. Lisbon gets 4 days.\n\nDirect flights "
        "exist between these cities:\nfrom Lisbon to Prague, from Prague to Vienna, from Vienna to Lisbon.\n\n"
        "Plan the 12 days using direct flights only.")
    assert bench.render(lisbon, tokenizer).startswith("<|user|>\nPlan the trip")
    for sample in samples:
        assert bench.score(sample, sample.references[0])["score"] == 1.0
    assert bench.score(samples[1], samples[0].references[0])["score"] == 0.0
    summary = bench.aggregate([{"category": s.category, **bench.score(s, "no plan")} for s in samples])
    assert summary["longproc"]["travel_planning_8k"] == {"accuracy": 0.0, "partial_accuracy": 0.0,
                                                         "extraction_rate": 0.0}


def test_longproc_travel_planning_checks_the_gold_plan(tmp_path):
    import json
    import shutil

    root = tmp_path / "longproc"
    shutil.copytree(FIXTURES / "longproc" / "data" / "travel_planning", root / "data" / "travel_planning")
    data = root / "data" / "travel_planning" / "travel_planning_all.json"
    rows = json.loads(data.read_text())
    rows[0]["ground_truth_plan"] = rows[0]["ground_truth_plan"].replace("Prague for 5 days", "Prague for 6 days")
    data.write_text(json.dumps(rows))
    bench = get_benchmark("longproc")
    bench.configure(subset="travel_planning_2k")
    with pytest.raises(ValueError, match="trip_fixture_lisbon: the searched plan differs from ground_truth_plan"):
        bench.load(root)


def test_longproc_takes_helmets_items(tmp_path, monkeypatch):
    """HELMET evaluates `Dataset.shuffle(seed=42).select(range(100))` of each file: numpy's default_rng(42)
    permutation, first 100. Here 7 items, 4 kept."""
    import json
    import shutil

    import numpy as np

    from trimkv.eval import longproc

    root = tmp_path / "longproc" / "data" / "path_traversal"
    shutil.copytree(FIXTURES / "longproc" / "data" / "path_traversal", root)
    data = root / "path_traversal_0.5k.json"
    row = json.loads(data.read_text())[0]
    data.write_text(json.dumps([{**row, "context_nl": f"{row['context_nl']} #{i}"} for i in range(7)]))
    monkeypatch.setattr(longproc, "ITEMS_PER_FILE", 4)
    bench = get_benchmark("longproc")
    bench.configure(subset="path_traversal_0.5k")
    samples = bench.load(tmp_path / "longproc")
    expected = np.random.default_rng(42).permutation(7)[:4].tolist()
    assert [s.id for s in samples] == [f"path_traversal_0.5k/{i}" for i in expected]
    assert all(f"#{i}" in s.prompt for i, s in zip(expected, samples))


def test_longmemeval_prompt_and_judge_parsing(tokenizer, monkeypatch):
    bench, samples = load("longmemeval", judge_model="stub")
    first = samples[0]
    assert first.category == "single-session-user" and "Current Date: 2023/05/30 (Tue) 10:00" in first.prompt
    # sessions in time order, has_answer flags dropped
    assert first.prompt.index("My dog Rex") < first.prompt.index('"hi"') and "has_answer" not in first.prompt
    assert samples[1].meta["abstention"] and bench.render(first, tokenizer).startswith("<|user|>")
    asked = []
    monkeypatch.setattr(bench, "ask_judge", lambda prompts: asked.extend(prompts) or ["Yes.", "no", "yes"])
    scores = bench.score_batch(samples, ["Rex", "Acme", "chips"])
    assert [s["score"] for s in scores] == [1.0, 0.0, 1.0]
    assert "Correct Answer: Rex" in asked[0] and "unanswerable question" in asked[1] and "Rubric:" in asked[2]
    summary = bench.aggregate([{"category": s.category, **r} for s, r in zip(samples, scores)])
    assert summary["longmemeval_abstention_accuracy"] == 0.0


def test_longmemeval_needs_a_judge():
    with pytest.raises(ValueError, match="--judge-model"):
        load("longmemeval")


def test_longmemeval_judge_runs_a_local_model(tmp_path):
    """Plumbing only: a tiny random judge loaded from disk answers through generate; scores are 0 or 1."""
    judge = save_tiny_model(tmp_path / "judge")
    save_tiny_tokenizer(judge)
    bench, samples = load("longmemeval", judge_model=str(judge))
    scores = bench.score_batch(samples, ["w5 w6", "w7", "w8"])
    assert all(s["score"] in (0.0, 1.0) and isinstance(s["extracted"], str) for s in scores)
