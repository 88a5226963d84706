"""What every benchmark module provides, and the registry the runner looks benchmarks up in.

A benchmark is one module in `trimkv/eval/` with a `Benchmark` subclass decorated by `@register`:
where its data comes from (Hub id + pinned revision, the data step writes it under
resources/data/<name>/), how a record becomes a `Sample`, how a sample becomes the model's prompt,
the generation settings of the paper, and the scorer.
"""

from __future__ import annotations

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

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        """Samples from the files the data step wrote to `data_dir`, in a fixed order."""
        raise NotImplementedError

    def render(self, sample: Sample, tokenizer, thinking: bool = False) -> str:
        """The exact text fed to the model (chat template applied when `chat`)."""
        if not self.chat or getattr(tokenizer, "chat_template", None) is None:
            return sample.prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        """{"score": float in [0, 1], "extracted": the parsed answer or None, ...}."""
        raise NotImplementedError


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS[cls.name] = cls
    return cls


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]()
