"""The offline preset's task and base model: a synthetic long-horizon recall task, its word-level tokenizer,
and a tiny Qwen3-architecture model pretrained on it from scratch (`python -m trimkv synthetic --help`)."""

from trimkv.synthetic.task import TaskConfig, generate_splits, make_example, read_split, write_splits

__all__ = ["TaskConfig", "generate_splits", "make_example", "read_split", "write_splits"]
