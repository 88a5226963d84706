"""`synthetic`: the offline long-horizon recall task (trimkv/synthetic/task.py), the default preset's benchmark.

Data: not downloaded; `python -m trimkv synthetic generate --out <data_dir>` writes the splits
(`dataset`/`revision` are empty: nothing to fetch). `load` reads `<data_dir>/test.jsonl`, or
`validation.jsonl` with `--subset validation`.
Prompt: the raw task text (`chat = False`: the tiny base model was pretrained on plain text, and its
chat template is the identity on one user turn anyway). The prompt text starts with `<s>`.
Output: the model recites every fact in key order, `k0:v.. k1:v.. ...`, then `</s>`.
Score: accuracy over the answers; an answer counts when the first output word for its key carries
the right value (robust to a missing or extra word; one word per key is what the model was taught).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trimkv.eval.base import Benchmark, GenerationSettings, Sample, register


@register
class Synthetic(Benchmark):
    name = "synthetic"
    dataset = ""  # generated locally, see the module docstring
    revision = ""
    # One word per fact (8 by default) + </s>; the model stops itself, so room for up to 15 facts.
    settings = GenerationSettings(max_new_tokens=16)
    chat = False
    split = "test"

    def configure(self, subset=None, **options) -> None:
        """subset: the split to evaluate, "test" (default) or "validation" (choosing among training runs)."""
        if subset not in (None, "test", "validation"):
            raise ValueError(f"benchmark 'synthetic': subset is a split, test or validation; got {subset!r}")
        self.split = subset or "test"
        super().configure(**options)

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        from trimkv.synthetic.task import read_split

        return [Sample(id=e.id, prompt=e.prompt, references=[" ".join(e.answers)],
                       meta={"answers": e.answers, "fact_positions": e.fact_positions})
                for e in read_split(Path(data_dir), self.split, limit)]

    def score(self, sample: Sample, output: str) -> dict[str, Any]:
        answers = sample.meta.get("answers") or sample.references[0].split()
        said: dict[str, str] = {}
        for word in output.split():
            key, sep, value = word.partition(":")
            if sep and key not in said:
                said[key] = value
        correct = sum(said.get(key) == value for key, _, value in (a.partition(":") for a in answers))
        return {"score": correct / len(answers), "extracted": " ".join(
            f"{key}:{said[key]}" for key, _, _ in (a.partition(":") for a in answers) if key in said) or None,
            "correct": correct, "answers": len(answers)}
