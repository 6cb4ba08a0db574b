"""A word-level tokenizer for tiny test models (one id per word); not a test module."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(64)]  # tiny_llama's vocabulary


def word_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """Word ``i`` is id ``i``; unknown words are ``words[0]``."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend)
