"""GPT-2's 50,257-token byte-level BPE through tiktoken, built from OpenAI's encoder.json + vocab.bpe."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from kiln.data.fetch import resolve_dataset
from kiln.data.registry import get_dataset
from kiln.data.tokenizers.base import EOS, Tokenizer, outside_vocabulary, refuse_surrogates
from kiln.errors import TokenizerError

# GPT-2's pre-tokenizer pattern, as tiktoken writes it (same splits as the 2019 release).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENCODER_FILE, MERGES_FILE = "encoder.json", "vocab.bpe"


@functools.lru_cache(maxsize=8)
def _encoding(encoder_json: str, vocab_bpe: str, added: tuple[str, ...] = ()) -> tiktoken.Encoding:
    """GPT-2's encoding; `added` special tokens take ids 50257, 50258, ... in order."""
    specials = {EOS: 50256} | {name: 50257 + i for i, name in enumerate(added)}
    return tiktoken.Encoding(
        "gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=_ranks(encoder_json, vocab_bpe), special_tokens=specials
    )


@functools.lru_cache(maxsize=4)
def _ranks(encoder_json: str, vocab_bpe: str) -> dict[bytes, int]:
    # The merges must be GPT-2's byte for byte; the vocabulary may be OpenAI's encoder.json or Hugging
    # Face's vocab.json (other bytes, same mapping): tiktoken checks that it agrees with the merges.
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=get_dataset("gpt2-tokenizer").files["merges"].sha256,
        )
    except (ValueError, OSError, AssertionError, KeyError) as e:
        raise TokenizerError(
            f"{Path(encoder_json).parent}: not GPT-2's encoder.json + vocab.bpe ({e}); "
            "`kiln data get gpt2-tokenizer` fetches the real files"
        ) from None
    return ranks


class GPT2Tokenizer(Tokenizer):
    """The GPT-2 tokenizer. `<|endoftext|>` (50256) is EOS, also when it appears in the text."""

    kind = "gpt2"

    def __init__(self, encoder_json: Path, vocab_bpe: Path, added: tuple[str, ...] = ()):
        self.encoder_json, self.vocab_bpe, self.added = Path(encoder_json), Path(vocab_bpe), tuple(added)
        self._enc = _encoding(str(self.encoder_json), str(self.vocab_bpe), self.added)

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None = None) -> GPT2Tokenizer:
        """Find the files through the data mirror, cache or a download."""
        paths = resolve_dataset(get_dataset("gpt2-tokenizer"), data_dir)
        return cls(paths["encoder"], paths["merges"])

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {EOS: self._enc.eot_token} | {name: 50257 + i for i, name in enumerate(self.added)}

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(refuse_surrogates(text), allowed_special="all")

    def encode_plain(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(refuse_surrogates(text))

    def _with_added(self, chars: Sequence[str] = (), specials: Sequence[str] = ()) -> GPT2Tokenizer:
        new = tuple(s for s in specials if s not in self.special_tokens)
        return GPT2Tokenizer(self.encoder_json, self.vocab_bpe, self.added + new) if new else self

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [refuse_surrogates(t) for t in texts]
        return self._enc.encode_batch(texts, allowed_special="all", num_threads=os.cpu_count() or 1)

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # tiktoken releases the GIL while it encodes, so threads use every core.
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(self._encode_to_numpy, texts))

    def _encode_to_numpy(self, text: str) -> np.ndarray:
        return self._enc.encode_to_numpy(refuse_surrogates(text), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode(list(ids))
        except (KeyError, OverflowError):
            raise outside_vocabulary(self.kind, self.vocab_size) from None

    def _identity(self) -> bytes:
        files = get_dataset("gpt2-tokenizer").files
        added = "".join(f":{name}" for name in self.added)
        return f"gpt2:{files['encoder'].sha256}:{files['merges'].sha256}{added}".encode()

    def _save_files(self, folder: Path) -> dict:
        for source, name in ((self.encoder_json, ENCODER_FILE), (self.vocab_bpe, MERGES_FILE)):
            if source.resolve() != (folder / name).resolve():
                shutil.copyfile(source, folder / name)
        return {"added": list(self.added)} if self.added else {}

    @classmethod
    def from_meta(cls, meta: dict, folder: Path) -> GPT2Tokenizer:
        return cls(folder / ENCODER_FILE, folder / MERGES_FILE, tuple(meta.get("added", ())))
