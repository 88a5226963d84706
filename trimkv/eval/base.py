"""What every benchmark module provides, and the registry the runner looks benchmarks up in.

A benchmark is one module in `trimkv/eval/` with a `Benchmark` subclass decorated by `@register`:
where its data comes from (Hub id + pinned revision, the data step writes it under
resources/data/<name>/), how a record becomes a `Sample`, how a sample becomes the model's prompt,
the generation settings of the paper, and the scorer.

Add a benchmark: a module with the data source (an entry in `trimkv/data.py` under the same name),
`load` into Samples, the prompt (`render`, or `chat = False` for raw text), `settings`, `score`
returning {"score", "extracted"}; import it in `trimkv/eval/__init__.py`; a fixture in the real
schema under tests/fixtures/<name>/ with a test that loads, renders and scores known outputs.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Sample:
    """One evaluation item, the same shape for every benchmark."""

    id: str
    prompt: str  # the user turn (or the raw text prompt when the benchmark uses no chat template)
    references: list[str]  # gold answers; the scorer decides how they are compared
    category: str = ""  # task / subset / difficulty, for per-category scores
    meta: dict[str, Any] = field(default_factory=dict)  # anything the prompt or scorer needs


@dataclass
class GenerationSettings:
    """Decoding settings of the paper for one benchmark; the runner's flags override them."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    samples: int = 1  # generations per problem (pass@1 averages over them)


class Benchmark:
    name: ClassVar[str]
    dataset: ClassVar[str]  # Hugging Face Hub dataset id
    revision: ClassVar[str]  # pinned revision (commit sha) of `dataset`
    settings: ClassVar[GenerationSettings]
    chat: ClassVar[bool] = True  # render the prompt with the model's chat template
    thinking: ClassVar[bool] = False  # default of enable_thinking for reasoning chat templates
    max_input_tokens: ClassVar[int | None] = None  # prompts longer than this are cut in the middle
    multi_turn: ClassVar[bool] = False  # samples are turns of conversations sharing one cache (SCBench)

    def configure(self, **options) -> None:
        """Benchmark-specific options from the command line (e.g. `tasks`, `judge_model`)."""
        unknown = {k for k, v in options.items() if v is not None}
        if unknown:
            raise ValueError(f"benchmark {self.name!r} takes no option(s) {', '.join(sorted(unknown))}")

    def bind(self, model, tokenizer) -> None:
        """The runner hands over the evaluated model and its tokenizer (a judge may reuse them)."""

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        """Samples from the files the data step wrote to `data_dir`, in a fixed order."""
        raise NotImplementedError

    def render(self, sample: Sample, tokenizer, thinking: bool = False) -> str:
        """The exact text fed to the model (chat template applied when `chat`)."""
        if not self.chat or getattr(tokenizer, "chat_template", None) is None:
            return sample.prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)

    def encode(self, sample: Sample, tokenizer, thinking: bool = False, max_input_tokens: int | None = None
               ) -> list[int]:
        """Token ids of the rendered prompt; the user text is first cut in the middle to `max_input_tokens`
        (LongBench's rule: the start and the end of a long prompt hold the instructions)."""
        if max_input_tokens is not None:
            cut = truncate_middle(sample.prompt, tokenizer, max_input_tokens)
            if cut != sample.prompt:
                sample = Sample(sample.id, cut, sample.references, sample.category, sample.meta)
        text = self.render(sample, tokenizer, thinking)
        templated = text != sample.prompt  # the chat template already holds any BOS token
        return tokenizer(text, add_special_tokens=not templated)["input_ids"]

    def max_new_tokens(self, sample: Sample) -> int:
        """Generation length of one sample (some benchmarks set it per task)."""
        return int(sample.meta.get("max_new_tokens", self.settings.max_new_tokens))

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        """{"score": float in [0, 1], "extracted": the parsed answer or None, ...}."""
        raise NotImplementedError

    def score_batch(self, samples: list[Sample], outputs: list[str]) -> list[dict[str, Any]]:
        """Score several outputs at once (a judge model batches them); by default one by one."""
        return [self.score(s, o) for s, o in zip(samples, outputs)]

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Benchmark-specific summary numbers beyond the mean and per-category scores (rows: samples.jsonl)."""
        return {}

    # ---- multi-turn benchmarks (multi_turn = True) ----

    def follow_up(self, sample: Sample, previous: Sample, tokenizer, thinking: bool = False) -> str:
        """Text appended after turn `previous`'s generation prompt to reach `sample`'s generation prompt:
        the previous turn's gold answer (`previous.meta["gold_text"]`), the end of that assistant turn and
        the next user turn (`sample.prompt`), cut from the chat template rendered around placeholders; with
        no chat template, the gold answer and `sample.meta["plain_after_gold"]`."""
        gold = str(previous.meta["gold_text"])
        if not self.chat or getattr(tokenizer, "chat_template", None) is None:
            return gold + sample.meta["plain_after_gold"]
        answer, question = "<<trimkv-assistant-turn>>", "<<trimkv-user-turn>>"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer},
             {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True,
            enable_thinking=thinking)
        if answer not in text or question not in text:
            raise ValueError("the chat template does not render assistant turns verbatim; cannot build multi-turn prompts")
        return gold + text.split(answer, 1)[1].replace(question, sample.prompt)


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS[cls.name] = cls
    return cls


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]()


# ---- helpers shared by the benchmark modules ----

def truncate_middle(text: str, tokenizer, max_tokens: int) -> str:
    """`text` cut to `max_tokens` tokens by dropping its middle (LongBench / SCBench / LongBench-V2 rule)."""
    if max_tokens <= 0:
        raise ValueError(f"max_input_tokens must be positive, got {max_tokens}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:],
                                                                                       skip_special_tokens=True)


def data_files(data_dir: Path, pattern: str) -> list[Path]:
    """Files under `data_dir` matching the glob `pattern`, sorted; a clear error if there are none."""
    data_dir = Path(data_dir)
    files = sorted(Path(p) for p in glob.glob(str(data_dir / pattern), recursive=True))
    if not files:
        hint = "" if data_dir.exists() else " (directory does not exist)"
        raise ValueError(f"no data files {pattern!r} in {data_dir}{hint}; run `python -m trimkv data fetch "
                         f"<name> --out {data_dir}` first")
    return files


def read_rows(files: list[Path]) -> list[dict[str, Any]]:
    """Rows of parquet / json (array) / jsonl files, in file order."""
    rows: list[dict[str, Any]] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(path).to_pylist())
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
        elif path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            rows.extend(data if isinstance(data, list) else [data])
        else:
            raise ValueError(f"cannot read {path}: expected .parquet, .json or .jsonl")
    return rows


def option_list(value, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
    """A comma-separated option (or list) checked against the valid names; None means all of them."""
    if value is None:
        return list(valid)
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return names
