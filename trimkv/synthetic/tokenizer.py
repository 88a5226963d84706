"""A word-level tokenizer for the synthetic task, built with `tokenizers`, loadable by AutoTokenizer.

One task word = one token (whitespace split). The tokenizer adds no special tokens of its own: the
task's prompts start with the text `<s>`, which is matched as the special token, so `tokenizer(prompt)`
gives the ids the model was pretrained on whether a caller adds special tokens or not (a runner that
tokenizes a rendered chat prompt with `add_special_tokens=False` gets the same ids). Specials are
bracketed (`<unk>`): transformers 5.x matches special tokens inside words, so a special must never be
a prefix of a task word.

Chat template: the model is a base model pretrained on plain text, so the template is the identity on
a single user turn (`apply_chat_template([user p], add_generation_prompt=True) == p`) and an assistant
turn is appended as ` <content> </s>`, exactly the pretraining format. The `synthetic` benchmark
therefore sets `chat = False`; a harness that renders with the template anyway gets the same prompt.
"""

from __future__ import annotations

from pathlib import Path

from trimkv.synthetic.task import BOS, EOS, PAD, UNK, TaskConfig

SPECIALS = (PAD, UNK, BOS, EOS)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{{- message['content'] -}}"
    "{%- if message['role'] == 'assistant' %} " + EOS + "{% endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer(config: TaskConfig):
    """A `PreTrainedTokenizerFast` over the task's words (ids: specials first, then `config.words()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIALS + tuple(config.words()))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own: join with single spaces.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS, clean_up_tokenization_spaces=False,
                                        model_max_length=max(config.length, 1 << 16))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(config: TaskConfig, out: Path):
    tokenizer = build_tokenizer(config)
    tokenizer.save_pretrained(out)
    return tokenizer
