"""The one Tokenizer interface every stage uses, and loading any saved tokenizer from its folder."""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.atomic import atomic_file
from kiln.data.words import save_words
from kiln.errors import TokenizerError

META_FILE = "kiln_tokenizer.json"
EOS = "<|endoftext|>"
NOT_IN_VOCABULARY = "is not in the char vocabulary; rebuild the vocabulary on this text, or use --unk"
SURROGATE = (
    "is half of a UTF-16 surrogate pair, not a character (a \\uD800-style escape without its other half?); "
    "remove it or write the whole character"
)
_SURROGATES = re.compile("[\ud800-\udfff]")


class UnknownCharacter(TokenizerError):
    """Text holds a character the tokenizer cannot read: one a char vocabulary lacks, or a lone surrogate."""

    def __init__(self, char: str, position: int, why: str = NOT_IN_VOCABULARY):
        super().__init__(f"character {char!r} (U+{ord(char):04X}) at position {position:,} {why}")
        self.char, self.position = char, position


def refuse_surrogates(text: str) -> str:
    """`text`, or an UnknownCharacter for its first lone surrogate: UTF-8 cannot hold one, so no byte-level
    tokenizer could give it back (tiktoken would write U+FFFD, HF tokenizers raise a bare TypeError)."""
    if not text.isascii() and (found := _SURROGATES.search(text)):
        raise UnknownCharacter(found.group(), found.start(), SURROGATE)
    return text


def outside_vocabulary(kind: str, vocab_size: int) -> TokenizerError:
    return TokenizerError(f"an id is outside this {kind} vocabulary of {vocab_size} tokens")


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods.

    `words` holds the counts of the words the model has read (kiln.data.words), when they were counted:
    saved beside the tokenizer as words.txt, they travel with it into every checkpoint."""

    kind: str = ""
    words: dict[str, int] | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids for `text` (a corpus); special-token text in it becomes the special token."""

    @abstractmethod
    def encode_plain(self, text: str) -> list[int]:
        """Ids for `text` with special-token text spelled out as ordinary text: for what a user types,
        so that typing `<|endoftext|>` cannot end a turn or forge a role."""

    def with_added(self, chars: Sequence[str] = (), specials: Sequence[str] = ()) -> Tokenizer:
        """This tokenizer with the given special tokens (and, for char vocabularies, characters) added
        after its last id; itself when nothing is missing. Existing ids keep their meaning, and its words."""
        grown = self._with_added(chars, specials)
        if grown is not self:
            grown.words = self.words
        return grown

    def _with_added(self, chars: Sequence[str], specials: Sequence[str]) -> Tokenizer:
        missing = [s for s in specials if s not in self.special_tokens]
        if missing:
            raise TokenizerError(f"a {self.kind} tokenizer cannot take new tokens ({', '.join(missing)})")
        return self

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`, special tokens written out."""

    @abstractmethod
    def _save_files(self, folder: Path) -> dict:
        """Write the files that define this tokenizer; return the extra metadata to record."""

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get(EOS)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Fast path for corpora: one int64 array per text (subclasses parallelise it)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def describe(self) -> str:
        return f"{self.kind} ({self.vocab_size:,} tokens)"

    def fingerprint(self) -> str:
        """sha256 of what defines the mapping, to tell two tokenizers apart."""
        return hashlib.sha256(self._identity()).hexdigest()

    @abstractmethod
    def _identity(self) -> bytes:
        """Bytes that define the mapping (vocabulary, merges, special tokens)."""

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer into `folder` (created if needed) with a kiln_tokenizer.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "fingerprint": self.fingerprint(),
            **self._save_files(folder),
        }
        if self.words is not None:
            save_words(self.words, folder)
        with atomic_file(folder / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return folder


def read_meta(folder: Path) -> dict:
    """The kiln_tokenizer.json of a saved tokenizer, or a TokenizerError saying what is missing."""
    meta_path = Path(folder) / META_FILE
    if not meta_path.is_file():
        raise TokenizerError(
            f"{folder}: not a Kiln tokenizer folder (no {META_FILE}); "
            "make one with `kiln tokenizer train DATA --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{meta_path}: not UTF-8 at byte {e.start:,}: it is damaged; save it again") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{meta_path}: holds a {type(meta).__name__}, not a tokenizer's settings; save it again")
    return meta
