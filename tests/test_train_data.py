"""Training data: every schema renders through the chat template, order is seeded, packing and resume are exact."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_tokenizer
from transformers import AutoTokenizer

from trimkv.train.data import SequenceStream, check_tokenizer, open_files

CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"


def words(*ids):
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def all_sequences(stream, n):
    return [next(stream).tolist() for _ in range(n)]


def test_every_schema_renders_the_conversation(tmp_path, tokenizer):
    files = [
        write_parquet(tmp_path / "openr1.parquet", [{"problem": "ignored", "messages": [
            {"role": "user", "content": words(5, 6)}, {"role": "assistant", "content": words(7)}]}]),
        write_jsonl(tmp_path / "pr.jsonl", [{"prompt": words(8), "response": words(9, 10), "system": words(11)}]),
        tmp_path / "longalpaca.json",
        write_jsonl(tmp_path / "text.jsonl", [{"text": words(20, 21, 22)}]),
    ]
    files[2].write_text(json.dumps([{"instruction": words(12), "output": words(13), "file": "x"}]))  # JSON array
    stream = SequenceStream(open_files(files), tokenizer, max_length=64)
    got = sorted(all_sequences(stream, 4))
    s, e = 1, 2  # <s>, </s>
    assert got == sorted([[s, 5, 6, e, s, 7, e], [s, 11, e, s, 8, e, s, 9, 10, e], [s, 12, e, s, 13, e],
                          [20, 21, 22, e]])  # plain text: no template, EOS appended


def test_booksum_and_buddhi_schemas(tmp_path, tokenizer):
    from trimkv.train.data import SUMMARIZE_PROMPT

    book = write_jsonl(tmp_path / "booksum.jsonl", [{"bid": 1, "chapter": words(5), "summary_text": words(6)}])
    qa = write_jsonl(tmp_path / "buddhi.jsonl", [{"context": words(7), "extended_context": words(8, 9),
                                                   "question": words(10), "answer": words(11)}])
    files = open_files([book, qa])
    assert [f.schema.name for f in files] == ["booksum", "document-qa"]
    messages = [f.schema.to_messages(f.record(0)) for f in files]
    assert messages[0][0]["content"] == SUMMARIZE_PROMPT + "w5"
    assert messages[1] == [{"role": "user", "content": "w8 w9\n\nQuestion: w10"},
                           {"role": "assistant", "content": "w11"}]


def numbered(tmp_path, n=12, length=5):
    """n records; record k is `length` copies of word k + 4, so each sequence says where it came from."""
    rows = [{"prompt": words(*[k + 4] * length), "response": words(k + 4)} for k in range(n)]
    return open_files([write_jsonl(tmp_path / "n.jsonl", rows)])


def test_order_is_a_seeded_permutation_per_epoch(tmp_path, tokenizer):
    files = numbered(tmp_path)
    first = [s[1] for s in all_sequences(SequenceStream(files, tokenizer, 64, seed=3), 24)]
    again = [s[1] for s in all_sequences(SequenceStream(files, tokenizer, 64, seed=3), 24)]
    other = [s[1] for s in all_sequences(SequenceStream(files, tokenizer, 64, seed=4), 24)]
    assert first == again and first != other
    assert sorted(first[:12]) == sorted(first[12:]) == list(range(4, 16))  # every record once per epoch
    assert first[:12] != first[12:]  # reshuffled each epoch


def test_truncation_and_packing(tmp_path, tokenizer):
    files = numbered(tmp_path)  # each record renders to 10 tokens
    assert {len(s) for s in all_sequences(SequenceStream(files, tokenizer, 7), 12)} == {7}
    packed = all_sequences(SequenceStream(files, tokenizer, 25, pack=True), 12)
    assert {len(s) for s in packed} == {20}  # two whole records fit in 25, a third does not
    tokens = [t for s in packed for t in s]
    assert sorted(set(tokens) - {1, 2}) == list(range(4, 16))  # nothing dropped
    long = all_sequences(SequenceStream(files, tokenizer, 8, pack=True), 3)
    assert {len(s) for s in long} == {8}  # a record longer than max_length is truncated and stands alone


@pytest.mark.parametrize("pack", [False, True])
def test_state_dict_resumes_exactly(tmp_path, tokenizer, pack):
    files = numbered(tmp_path, n=7)
    stream = SequenceStream(files, tokenizer, 25, pack=pack, seed=1)
    all_sequences(stream, 5)  # crosses an epoch boundary when packing
    state = stream.state_dict()
    expected = all_sequences(stream, 9)
    resumed = SequenceStream(files, tokenizer, 25, pack=pack, seed=1)
    resumed.load_state_dict(state)
    assert all_sequences(resumed, 9) == expected


def test_bad_inputs_fail_with_the_file_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="not found: .*missing.jsonl"):
        open_files([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="no known record schema in columns \\['foo'\\]"):
        open_files([write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])])
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        (tmp_path / "a.csv").write_text("x")
        open_files([tmp_path / "a.csv"])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read .*broken.jsonl"):
        open_files([tmp_path / "broken.jsonl"])
    (tmp_path / "broken.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*broken.parquet"):
        open_files([tmp_path / "broken.parquet"])
    with pytest.raises(ValueError, match="empty.jsonl has no records"):
        open_files([write_jsonl(tmp_path / "empty.jsonl", [])])


def test_chat_records_need_a_chat_template(tmp_path):
    plain = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    chat = open_files([write_jsonl(tmp_path / "c.jsonl", [{"prompt": "w4", "response": "w5"}])])
    with pytest.raises(ValueError, match="tokenizer tok-name has no chat template.*c.jsonl"):
        check_tokenizer(plain, chat, "tok-name")
    check_tokenizer(plain, open_files([write_jsonl(tmp_path / "t.jsonl", [{"text": "w4 w5"}])]), "tok-name")


def test_a_record_that_breaks_its_schema_is_named(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "w4"}]}, {"messages": [{"content": "w5"}]}]
    stream = SequenceStream(open_files([write_jsonl(tmp_path / "m.jsonl", rows)]), tokenizer, 16)
    with pytest.raises(ValueError, match="m.jsonl: record 1 does not fit the messages schema"):
        [next(stream) for _ in range(2)]


def test_a_fetched_dataset_directory_stands_for_its_manifest_files(tmp_path):
    data = tmp_path / "openr1_math"
    (data / "data").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl"):
        (data / "data" / name).write_text(json.dumps({"text": "w5 w6"}) + "\n")
    (data / "notes.txt").write_text("not data")
    manifest = {"files": {"data/a.jsonl": {}, "data/b.jsonl": {}, "notes.txt": {}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert [f.path.name for f in open_files([data])] == ["a.jsonl", "b.jsonl"]
    (data / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        open_files([data])
