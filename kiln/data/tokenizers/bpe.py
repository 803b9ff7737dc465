"""Train your own byte-level BPE with Hugging Face `tokenizers`, with chat special tokens reserved."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kiln.data.chunking import safe_chunks
from kiln.data.tokenizers.base import EOS, Tokenizer, outside_vocabulary, refuse_surrogates
from kiln.errors import TokenizerError

PAD = "<|pad|>"
# Reserved at training time so fine-tuning and chat never need to grow the vocabulary.
SPECIAL_TOKENS = (EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
CORPUS_PIECE_CHARS = 128 << 10


class BPETokenizer(Tokenizer):
    """A byte-level BPE (GPT-2's scheme): every UTF-8 text round-trips exactly."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
    ) -> BPETokenizer:
        """Learn merges from `texts` until the vocabulary has `vocab_size` ids (specials included)."""
        if vocab_size < MIN_VOCAB:
            raise TokenizerError(
                f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {token.content: i for i, token in self.hf.get_added_tokens_decoder().items() if token.special}

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(refuse_surrogates(text), add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(refuse_surrogates(text), add_special_tokens=False).ids

    @functools.cached_property
    def _plain(self) -> HFTokenizer:
        plain = HFTokenizer.from_str(self.hf.to_str())
        plain.encode_special_tokens = True  # special-token text is split like any other text
        return plain

    def _with_added(self, chars: Sequence[str] = (), specials: Sequence[str] = ()) -> BPETokenizer:
        new = [s for s in specials if s not in self.special_tokens]
        if not new:
            return self
        grown = HFTokenizer.from_str(self.hf.to_str())
        grown.add_special_tokens(new)
        return BPETokenizer(grown)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch runs on every core (Rust threads).
        texts = [refuse_surrogates(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # An HF Encoding keeps offsets and strings per token (~140 bytes each), so a corpus batch is
        # encoded one text at a time, cut at safe seams into small pieces that run on every core.
        arrays = []
        for text in texts:
            pieces = list(safe_chunks([refuse_surrogates(text)], CORPUS_PIECE_CHARS))
            encodings = self.hf.encode_batch_fast(pieces, add_special_tokens=False)
            ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
            arrays.append(np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32))
        return arrays

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self.hf.decode(list(ids), skip_special_tokens=False)
        except OverflowError:  # a negative id, or one past 2**32
            raise outside_vocabulary(self.kind, self.vocab_size) from None

    def _identity(self) -> bytes:
        return self.hf.to_str().encode()

    def _save_files(self, folder: Path) -> dict:
        self.hf.save(str(folder / TOKENIZER_FILE))
        return {}

    @classmethod
    def from_meta(cls, meta: dict, folder: Path) -> BPETokenizer:
        try:
            return cls(HFTokenizer.from_file(str(folder / TOKENIZER_FILE)))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{folder / TOKENIZER_FILE}: cannot load it ({e})") from None
