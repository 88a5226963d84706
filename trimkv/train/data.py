"""Training sequences: chat-formatted samples from local parquet / jsonl / json files, tokenized and packed.

Each file's columns decide how a record becomes a conversation (the first schema whose columns are all
present wins; the paper's training sets in their published schemas, see shared/notes/dataset-schemas.md):

    messages                        [{role, content}, ...] as is (OpenR1-Math-220k, any chat set)
    prompt, response                user prompt, assistant response (optional `system` column)
    instruction, output             LongAlpaca-12k (user = instruction, plus `input` when non-empty)
    chapter, summary_text           BookSum: user = SUMMARIZE_PROMPT + chapter, assistant = summary
    context, question, answer       Buddhi: user = document + question (`extended_context` preferred)
    text                            plain text, no chat template (e.g. pretraining-style data)

The BookSum and Buddhi prompt wording is ours: the paper does not publish its training prompts.
Conversations are rendered with the tokenizer's chat template, tokenized, and truncated to max_length; with
packing, whole samples are concatenated greedily up to max_length (a sample that does not fit starts the next
sequence; one longer than max_length is truncated and stands alone). Order: a permutation of all records of
all files by (seed, epoch); the stream's position is (epoch, cursor), so it resumes exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUMMARIZE_PROMPT = "Summarize the following chapter.\n\n"
SUFFIXES = (".parquet", ".jsonl", ".json")


def _messages(r: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in r["messages"]]


def _prompt_response(r: dict) -> list[dict]:
    system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return system + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]


def _instruction_output(r: dict) -> list[dict]:
    user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def _booksum(r: dict) -> list[dict]:
    return [{"role": "user", "content": SUMMARIZE_PROMPT + r["chapter"]},
            {"role": "assistant", "content": r["summary_text"]}]


def _document_qa(r: dict) -> list[dict]:
    document = r.get("extended_context") or r["context"]
    return [{"role": "user", "content": f"{document}\n\nQuestion: {r['question']}"},
            {"role": "assistant", "content": r["answer"]}]


@dataclass(frozen=True)
class Schema:
    name: str
    columns: tuple[str, ...]  # required
    optional: tuple[str, ...]
    to_messages: Callable[[dict], list[dict]] | None  # None: plain text, no chat template

    @property
    def chat(self) -> bool:
        return self.to_messages is not None


SCHEMAS = (
    Schema("messages", ("messages",), (), _messages),
    Schema("prompt/response", ("prompt", "response"), ("system",), _prompt_response),
    Schema("instruction/output", ("instruction", "output"), ("input",), _instruction_output),
    Schema("booksum", ("chapter", "summary_text"), (), _booksum),
    Schema("document-qa", ("context", "question", "answer"), ("extended_context",), _document_qa),
    Schema("text", ("text",), (), None),
)


def detect_schema(columns: list[str] | set[str], file: Path) -> Schema:
    for schema in SCHEMAS:
        if set(schema.columns) <= set(columns):
            return schema
    known = "; ".join(" + ".join(s.columns) for s in SCHEMAS)
    raise ValueError(f"{file}: no known record schema in columns {sorted(columns)}; expected one of: {known}")


class _File:
    """One data file: its schema and random access to its records (only the columns the schema reads)."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.read_schema(path).names
            except Exception as e:  # noqa: BLE001 (not parquet, truncated, ...)
                raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None
            self.schema = detect_schema(names, path)
            wanted = [c for c in self.schema.columns + self.schema.optional if c in names]
            self._table = pq.read_table(path, columns=wanted)
            self._rows = None
            self.n = self._table.num_rows
        else:
            self._table, self._rows = None, _read_json_records(path)
            self.n = len(self._rows)
            if self.n:
                self.schema = detect_schema(self._rows[0].keys(), path)
        if self.n == 0:
            raise ValueError(f"{path} has no records")

    def record(self, i: int) -> dict[str, Any]:
        if self._rows is not None:
            return self._rows[i]
        return self._table.slice(i, 1).to_pylist()[0]


def _read_json_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):  # one JSON array (e.g. LongAlpaca-12k.json)
            rows = json.loads(text)
        else:  # JSON lines
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {path}: not JSON lines or a JSON array: {e}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"cannot read {path}: every record must be a JSON object")
    return rows


def open_files(paths: list[str | os.PathLike]) -> list[_File]:
    """Open and check every data file (exists, readable, a known schema) before anything else runs."""
    if not paths:
        raise ValueError("no training data files given")
    files = []
    for p in (f for path in map(Path, paths) for f in _expand(path)):
        if not p.is_file():
            raise ValueError(f"training data file not found: {p}")
        if p.suffix not in SUFFIXES:
            raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; expected one of {SUFFIXES}")
        files.append(_File(p))
    return files


def _expand(path: Path) -> list[Path]:
    """A directory written by `python -m trimkv data fetch` stands for the data files its manifest lists."""
    manifest = path / "manifest.json"
    if not path.is_dir():
        return [path]
    if not manifest.is_file():
        raise ValueError(f"training data directory {path} has no manifest.json (write it with `python -m trimkv data fetch`)")
    names = sorted(json.loads(manifest.read_text())["files"])
    return [path / name for name in names if Path(name).suffix in SUFFIXES]


def check_tokenizer(tokenizer, files: list[_File], name: str) -> None:
    """A chat-formatted file needs a tokenizer with a chat template: fail now, with the names, if it has none."""
    chat = [f.path for f in files if f.schema.chat]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {name} has no chat template, needed to render the chat records of {chat[0]}"
                         " (give --tokenizer one that has, or use plain `text` records)")


class SequenceStream(Iterator[torch.Tensor]):
    """An endless, deterministic stream of token sequences (1-D LongTensors of 2 .. max_length tokens).

    state_dict() / load_state_dict() capture the position exactly: (epoch, cursor into that epoch's order).
    """

    def __init__(self, files: list[_File], tokenizer, max_length: int, pack: bool = False, seed: int = 0):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.files, self.tokenizer, self.max_length, self.pack, self.seed = files, tokenizer, max_length, pack, seed
        self._offsets = torch.tensor([0] + [f.n for f in files]).cumsum(0)  # global index -> file
        self.n = int(self._offsets[-1])
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)
        self._memo: tuple[int, list[int]] | None = None  # the last record tokenized (packing peeks at it)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order, self._memo = self._permutation(self.epoch), None

    def tokens(self, index: int) -> list[int]:
        """Record `index` (global) rendered and tokenized, truncated to max_length."""
        if self._memo is not None and self._memo[0] == index:
            return self._memo[1]
        k = int(torch.searchsorted(self._offsets, index, right=True)) - 1
        file = self.files[k]
        record = file.record(index - int(self._offsets[k]))
        try:
            if file.schema.chat:
                text = self.tokenizer.apply_chat_template(file.schema.to_messages(record), tokenize=False)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(record["text"])["input_ids"]
                if self.tokenizer.eos_token_id is not None:
                    ids = ids + [self.tokenizer.eos_token_id]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{file.path}: record {index - int(self._offsets[k])} does not fit the "
                             f"{file.schema.name} schema: {type(e).__name__}: {e}") from None
        ids = ids[: self.max_length]
        self._memo = (index, ids)
        return ids

    def _advance(self) -> None:
        self.cursor += 1
        if self.cursor == self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)

    def __next__(self) -> torch.Tensor:
        sequence: list[int] = []
        looked = 0  # records seen since the last usable one: a whole epoch of nothing is an error
        while True:
            ids = self.tokens(int(self._order[self.cursor]))
            if self.pack and sequence and len(sequence) + len(ids) > self.max_length:
                break  # this record starts the next sequence
            if len(ids) >= 2 or (self.pack and ids):
                sequence += ids
            self._advance()
            looked += 1
            if len(sequence) >= 2 and (not self.pack or len(sequence) >= self.max_length):
                break
            if looked > self.n and not sequence:
                raise ValueError("the training data has no sample of at least 2 tokens")
        return torch.tensor(sequence, dtype=torch.long)
