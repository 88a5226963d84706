"""Tiny random-weight models of every supported family, built from configs (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

if not torch.cuda.is_available():  # Triton reads this when a kernel is defined: before any test imports one
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 97
# 2 layers, d=64, 4 query heads, 2 KV heads of dim 16 (Phi-3 derives head_dim = 64 / 4), a 97-token vocab.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS = {
    "qwen3": lambda **kw: Qwen3Config(head_dim=16, **kw),
    "qwen2": Qwen2Config,
    "llama": lambda **kw: LlamaConfig(head_dim=16, **kw),
    "mistral": lambda **kw: MistralConfig(sliding_window=None, **kw),
    "phi3": Phi3Config,
}
FAMILIES = tuple(sorted(CONFIGS))


def tiny_config(family: str = "qwen3", **overrides):
    """A tiny config of `family`; keyword overrides replace the shared defaults."""
    return CONFIGS[family](**{**COMMON, **overrides})


def tiny_model(family: str = "qwen3", seed: int = 0, attn: str = "sdpa", dtype=torch.float32, **overrides):
    """A tiny random-weight causal LM in eval mode, the same weights for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation=attn, dtype=dtype)
    # Random weights of this scale give near-uniform logits; sharpen them so greedy decoding is decisive.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


def save_tiny_model(directory: str | Path, family: str = "qwen3", seed: int = 0, **overrides) -> Path:
    """Save a tiny model with `save_pretrained`, so `from_pretrained(directory)` loads it offline."""
    directory = Path(directory)
    tiny_model(family, seed, **overrides).save_pretrained(directory)
    return directory


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def save_tiny_tokenizer(directory: str | Path) -> Path:
    """A word-level tokenizer over the tiny vocab ("w4" ... "w96" plus specials), loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return Path(directory)


@pytest.fixture
def one_thread():
    """Tiny tensors: more threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
