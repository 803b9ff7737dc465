"""Tokenizers: `char` (built from a corpus), `gpt2` (tiktoken) and `bpe` (trained with HF tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.data.tokenizers.base import EOS, META_FILE, Tokenizer, read_meta
from kiln.data.tokenizers.bpe import BPETokenizer
from kiln.data.tokenizers.char import CharTokenizer
from kiln.data.tokenizers.gpt2 import GPT2Tokenizer
from kiln.data.words import load_words
from kiln.errors import TokenizerError

KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "gpt2": GPT2Tokenizer, "bpe": BPETokenizer}

__all__ = [
    "EOS",
    "BPETokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_spec",
]


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save` (any kind)."""
    folder = Path(folder)
    meta = read_meta(folder)
    kind = KINDS.get(meta.get("kind", ""))
    if kind is None:
        raise TokenizerError(f"{folder / META_FILE}: unknown tokenizer kind {meta.get('kind')!r}")
    tokenizer = kind.from_meta(meta, folder)
    tokenizer.words = load_words(folder)
    return tokenizer


def tokenizer_from_spec(spec: str, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """`gpt2`, `bpe:DIR` or a saved tokenizer folder. (`char` is built from a corpus by `prepare`.)"""
    if spec == "gpt2":
        return GPT2Tokenizer.resolve(data_dir)
    if spec.startswith("bpe:"):
        tokenizer = load_tokenizer(spec[4:])
        if tokenizer.kind != "bpe":
            raise TokenizerError(f"{spec[4:]}: holds a {tokenizer.kind} tokenizer, not a trained bpe one")
        return tokenizer
    if Path(spec).is_dir():
        return load_tokenizer(spec)
    raise TokenizerError(
        f"unknown tokenizer '{spec}': use char, gpt2, bpe:DIR (a folder from `kiln tokenizer train`) "
        "or a saved tokenizer folder"
    )
