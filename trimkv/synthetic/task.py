"""The offline long-horizon task: facts stated early, recalled in order at the end, amid filler and
short-lived pairs that look just like facts.

One sequence (T = 256 tokens by default; every word is one token):

    <s> n12 k5:v3 n40 k0:v9 ... k2:v14 ... k11:v4 n7 n3 q11 k11:v4 ... n33 recall k0:v9 k1:v2 ... k7:v11 </s>
        |-- facts: K pairs, first quarter --|  |- short-lived pair --|        |--- answers, generated ---|

- Facts: K keys (default 8), each stated once as a pair token `k{i}:v{j}` with a random value (with
  replacement, so no "not-yet-used value" shortcut), at random places in the first quarter of the
  prompt body, in random key order. They matter until the very end.
- Short-lived pairs: pair tokens of other keys (`k8` ... `k23`, distinct within a sequence), each
  asked for 1-8 words later by its cue `q{key}`, after which the model repeats the pair (a lookup by
  key, exactly like a recall), anywhere in the prompt. They matter for a few tokens, then never
  again. They make the task discriminate: attention-based heuristics (H2O, SnapKV, TOVA) see them
  attended to while facts are not, and to key-geometry ones (KeyDiff, R-KV) they are outliers among
  filler keys just like facts; only knowing *how long* a token stays useful - what TRIM-KV's
  retention gates learn - tells them apart. Measured on the default model at T/16 (budget 16):
  without short-lived pairs KeyDiff kept the facts, the only outliers, and matched the full cache
  (0.99); with pairs repeated after one shared `again` cue H2O still reached 0.67; with per-key cues
  every heuristic stays <= 0.65 while a cache of facts + recent tokens scores 0.998.
- Filler: words `n0 ... n{F-1}` drawn like words of a text: Zipf-distributed (probability ~ 1/rank)
  under a ranking shuffled per sequence. (With i.i.d. uniform filler the tiny model leaned on the
  near-constant filler average as a "background", and a cache holding every fact still lost 10-20
  points once the filler was evicted; with per-sequence statistics keeping the facts is enough.)
- The prompt ends with `recall`; the model then recites every fact in key order `k0 ... k{K-1}` and
  stops with `</s>`. Each answer is one token whose key is implied by the previous one, so every
  answer is a one-hop lookup (the current token says which key comes next; attention finds its
  fact). The queries are thus generated during decoding, by the model itself, while the cache keeps
  evicting.

Why one token per fact and fixed-order queries: a 2-layer width-128 model on 2 CPU cores learns
one-token lookups in a few hundred steps, but not two-token facts (`k17 v42`), which need a two-hop
induction circuit; queries written into the prompt and answered in order would need the same
two-hop circuit to find the i-th query.

Determinism: sample i of a split is drawn from a generator seeded by (seed, split, i, attempt, T),
so any sample can be regenerated alone and a split is a prefix of its endless stream. Splits are
disjoint by construction: a draw whose fact assignment (the K values) was already used by a
held-out split is redrawn, so no validation/test assignment is ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}
# Held-out splits are generated first; each later split avoids the assignments of the earlier ones.
GENERATION_ORDER = ("test", "validation", "train")
FORMAT_VERSION = 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
RECALL = "recall"


@dataclass(frozen=True)
class TaskConfig:
    """Shape of the task. `length` counts every token of prompt + answers, <s> and </s> included."""

    length: int = 256  # 8x the smallest default budget (32), 16x a budget of 16
    keys: int = 8  # facts per sequence = answers per sequence
    values: int = 16  # values per key; chance accuracy is 1 / values
    filler: int = 64  # distinct filler words
    facts_span: float = 0.25  # facts lie in this leading fraction of the prompt body
    distractor_keys: int = 16  # keys k{K} ... of the short-lived pairs (asked for by `q{key}` soon, never recalled)
    distractors: float = 0.05  # short-lived episodes per prompt token (placed while they fit)
    distractor_gap: int = 8  # filler words between a short-lived pair and its repetition: 1 ... this
    filler_zipf: float = 1.0  # filler word of rank r has probability ~ 1 / r^s, ranks shuffled per sequence
    seed: int = 0

    def __post_init__(self):
        for name in ("length", "keys", "values", "filler"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TaskConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.distractor_keys < 0 or not 0 <= self.distractors < 1 or self.distractor_gap < 1:
            raise ValueError(f"TaskConfig needs distractor_keys >= 0, 0 <= distractors < 1, distractor_gap >= 1; "
                             f"got {self.distractor_keys}, {self.distractors}, {self.distractor_gap}")
        if self.n_distractors and not self.distractor_keys:
            raise ValueError("TaskConfig.distractors > 0 needs distractor_keys > 0")
        if self.filler_zipf < 0:
            raise ValueError(f"TaskConfig.filler_zipf must be >= 0, got {self.filler_zipf}")
        if not 0 < self.facts_span <= 1:
            raise ValueError(f"TaskConfig.facts_span must be in (0, 1], got {self.facts_span}")
        if self.span < self.keys:
            raise ValueError(f"length {self.length} leaves {self.span} fact places for {self.keys} keys; "
                             f"need length >= {self.min_length()}")

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt: <s>, body, `recall`."""
        return self.length - self.keys - 1

    @property
    def body(self) -> int:
        """Facts + filler between <s> and `recall`."""
        return self.length - self.keys - 3

    @property
    def span(self) -> int:
        return int(self.body * self.facts_span)

    @property
    def n_distractors(self) -> int:
        return round(self.distractors * max(self.body, 0))

    def filler_probs(self) -> np.ndarray:
        weights = 1.0 / np.arange(1, self.filler + 1) ** self.filler_zipf
        return weights / weights.sum()

    def min_length(self) -> int:
        body = int(np.ceil(self.keys / self.facts_span))
        while int(body * self.facts_span) < self.keys:
            body += 1
        return body + self.keys + 3

    def with_length(self, length: int) -> TaskConfig:
        return TaskConfig(**{**asdict(self), "length": length})

    def words(self) -> list[str]:
        """Every task word, in vocabulary order (specials are added by the tokenizer)."""
        keys = self.keys + self.distractor_keys
        return [RECALL] + [pair(k, v) for k in range(keys) for v in range(self.values)] + \
            [cue(k) for k in range(self.keys, keys)] + \
            [f"n{i}" for i in range(self.filler)]

    def default_budgets(self) -> list[int]:
        """A budget sweep from T/16 to T/2, rounded to multiples of 8 (smallest <= T/8)."""
        return sorted({max(8, (self.length // d) // 8 * 8) for d in (16, 8, 4, 2)})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TaskConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def pair(key: int, value: int) -> str:
    return f"k{key}:v{value}"


def cue(key: int) -> str:
    """The word asking for a short-lived pair: `q{key}`, answered by the pair `k{key}:v..`."""
    return f"q{key}"


@dataclass
class Example:
    """One sequence. Positions are token indices in the tokenized full text (<s> is position 0)."""

    id: str
    split: str
    prompt: str  # starts with "<s>" as text: every tokenization gives the same ids, special tokens added or not
    answers: list[str]  # the K pair tokens, in key order
    fact_positions: list[int]  # where k0 ... k{K-1} are stated
    values: list[int] = field(default_factory=list)
    distractor_positions: list[int] = field(default_factory=list)

    @property
    def completion(self) -> str:
        """What the model must generate after the prompt, before its closing </s>."""
        return " ".join(self.answers)

    @property
    def text(self) -> str:
        """Prompt + completion: a plain-text training record; </s> is appended by whoever trains on it (as
        for any plain-text corpus), giving exactly `length` tokens."""
        return self.prompt + " " + self.completion

    def to_json(self) -> dict:
        return {"id": self.id, "split": self.split, "prompt": self.prompt, "completion": self.completion,
                "text": self.text, "answers": self.answers, "fact_positions": self.fact_positions,
                "distractor_positions": self.distractor_positions, "values": self.values}

    @classmethod
    def from_json(cls, data: dict) -> Example:
        return cls(data["id"], data["split"], data["prompt"], data["answers"], data["fact_positions"],
                   data.get("values", []), data.get("distractor_positions", []))


def _rng(config: TaskConfig, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, _SPLIT_CODE[split], index, attempt, config.length])


def draw_words(config: TaskConfig, rng: np.random.Generator) -> tuple[list[str], list[int], list[int], list[int]]:
    """(full token words incl. <s> and </s>, fact positions, values, distractor positions) of one sequence."""
    K = config.keys
    values = rng.integers(0, config.values, size=K)
    ranking = rng.permutation(config.filler)  # this sequence's most frequent filler word first, ...
    body = [f"n{i}" for i in ranking[rng.choice(config.filler, size=config.body, p=config.filler_probs())]]
    places = np.sort(rng.choice(config.span, size=K, replace=False))  # body positions of the facts
    order = rng.permutation(K)  # which key is stated at each place
    positions = [0] * K
    for place, key in zip(places, order):
        body[place] = pair(int(key), int(values[key]))
        positions[key] = int(place) + 1  # + 1 for <s>
    taken = np.zeros(config.body + 1, dtype=np.int64)
    taken[places] = 1
    decoys = []
    decoy_keys = rng.permutation(np.arange(K, K + config.distractor_keys))  # distinct within a sequence
    for key in decoy_keys[:config.n_distractors]:  # episode: pair, gap filler words, its cue, the pair again
        gap = int(rng.integers(1, config.distractor_gap + 1))
        width = gap + 3
        busy = np.concatenate([[0], np.cumsum(taken)])  # busy[j] - busy[i]: taken places in [i, j)
        starts = np.flatnonzero(busy[width:config.body + 1] - busy[:config.body + 1 - width] == 0)
        if not len(starts):
            break
        start = int(rng.choice(starts))
        word = pair(int(key), int(rng.integers(0, config.values)))
        body[start], body[start + gap + 1], body[start + gap + 2] = word, cue(int(key)), word
        taken[start:start + width] = 1
        decoys += [start + 1, start + gap + 3]  # + 1 for <s>
    answers = [pair(k, int(values[k])) for k in range(K)]
    words = [BOS] + body + [RECALL] + answers + [EOS]
    return words, positions, [int(v) for v in values], sorted(decoys)


def make_example(config: TaskConfig, split: str, index: int, exclude: set[tuple[int, ...]] = frozenset(),
                 ) -> tuple[Example, list[str]]:
    """Sample `index` of `split`, redrawn while its value assignment is in `exclude`. Also returns the words."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    for attempt in range(1000):
        words, positions, values, decoys = draw_words(config, _rng(config, split, index, attempt))
        if tuple(values) not in exclude:
            break
    else:  # pragma: no cover - needs a task with almost no distinct assignments
        raise ValueError(f"cannot draw a {split} sample outside the held-out assignments; "
                         f"raise keys ({config.keys}) or values ({config.values})")
    prompt_words = words[:config.prompt_tokens]
    example = Example(f"{split}-{index:06d}", split, " ".join(prompt_words), words[config.prompt_tokens:-1],
                      positions, values, decoys)
    return example, words


def stream(config: TaskConfig, split: str, exclude: set[tuple[int, ...]] = frozenset(), start: int = 0,
           ) -> Iterator[tuple[Example, list[str]]]:
    """The endless stream of a split: samples start, start + 1, ... ."""
    index = start
    while True:
        yield make_example(config, split, index, exclude)
        index += 1


def assignment(example: Example) -> tuple[int, ...]:
    return tuple(example.values)


def generate_splits(config: TaskConfig, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """All splits, disjoint in their fact assignments (held-out splits first, then train avoids them)."""
    used: set[tuple[int, ...]] = set()
    out: dict[str, list[Example]] = {}
    for split in GENERATION_ORDER:
        exclude = frozenset(used)
        examples = []
        for index in range(sizes.get(split, 0)):
            example, _ = make_example(config, split, index, exclude)
            examples.append(example)
        if split != "train":
            used.update(assignment(e) for e in examples)
        out[split] = examples
    return {s: out[s] for s in SPLITS}


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)  # a killed run never leaves a half-written split behind


def read_split(data_dir: Path, split: str, limit: int | None = None) -> list[Example]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: write the splits with `python -m trimkv synthetic generate --out "
                         f"{data_dir}`")
    examples = []
    with path.open() as f:
        for line in f:
            if limit is not None and len(examples) >= limit:
                break
            examples.append(Example.from_json(json.loads(line)))
    return examples


def read_config(data_dir: Path) -> TaskConfig:
    path = Path(data_dir) / "task.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: write the splits with `python -m trimkv synthetic generate --out "
                         f"{data_dir}`")
    return TaskConfig.from_json(json.loads(path.read_text()))


def held_out_assignments(data_dir: Path) -> set[tuple[int, ...]]:
    """Fact assignments of validation + test: training streams must avoid them."""
    return {assignment(e) for split in ("validation", "test") for e in read_split(data_dir, split)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_splits(out: Path, config: TaskConfig, sizes: dict[str, int]) -> dict:
    """Write <split>.jsonl, task.json and manifest.json (sha256 of each file) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_splits(config, sizes)
    for split, examples in splits.items():
        write_jsonl(out / f"{split}.jsonl", (e.to_json() for e in examples))
    (out / "task.json").write_text(json.dumps({**config.to_json(), "format_version": FORMAT_VERSION}, indent=2))
    manifest = {
        "dataset": "trimkv-synthetic",
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "splits": {s: len(e) for s, e in splits.items()},
        "files": {p.name: _sha256(p) for p in sorted(out.glob("*.jsonl")) if p.stem in SPLITS}
        | {"task.json": _sha256(out / "task.json")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
