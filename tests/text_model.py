"""A tiny model directory with text: a random Llama plus a byte-level BPE tokenizer
trained here on text shipped in this file, with a chat template (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAINING_TEXT = """The quick brown fox jumps over the lazy dog.
Caching the key and value tensors of a shared prefix saves prefill work.
Schedulers decide which requests run in each step of the engine.
A server streams tokens to its clients as soon as they are sampled.
Café, naïve, façade: accents travel as two bytes in UTF-8.
日本語のテキストは三バイトの文字で書かれます。
Emoji such as 🚀 and 🎉 take four bytes each.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}"
    "{% endif %}<s>{{ m['role'] }}{% if m.name is defined and m.name %} {{ m.name }}{% endif %}"
    ": {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""Renders every role (and a message's `name` after it) but `tool`, which it refuses
(as Llama 2's and Mistral's templates refuse roles and orders they do not know)."""


def build_tokenizer(model_dir: Path | None = None, vocab_size: int = 400) -> Any:
    """A transformers `PreTrainedTokenizerFast` (BOS `<s>`, EOS `</s>`, the chat
    template above), saved into `model_dir` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    if model_dir is not None:
        fast.save_pretrained(str(model_dir))
    return fast


def build_text_model(model_dir: Path, max_position_embeddings: int = 256) -> Any:
    """A random float64 Llama whose vocabulary is the tokenizer's, both saved into
    `model_dir`. Returns the tokenizer."""
    from kvflow.engine_adapters.hf import save_random_hf_llama
    from kvflow.engine_adapters.torch import LlamaSpec

    tokenizer = build_tokenizer(model_dir)
    spec = LlamaSpec(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=500000.0,
        max_position_embeddings=max_position_embeddings,
        dtype="float64",
    )
    save_random_hf_llama(spec, model_dir, seed=5, init_std=0.2)
    return tokenizer
