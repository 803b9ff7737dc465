"""Character-level tokenizer: one id per distinct character of the corpus (nanoGPT's shakespeare_char)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from kiln.data.tokenizers.base import Tokenizer, UnknownCharacter, outside_vocabulary
from kiln.errors import TokenizerError

UNK = "<unk>"
Added = tuple[str, bool]  # (text, is_special)


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are the sorted characters; special tokens (and `<unk>` when asked for) follow them."""

    kind = "char"

    def __init__(
        self, chars: Iterable[str], specials: Sequence[str] = (), unk: bool = False, added: Sequence[Added] = ()
    ):
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise TokenizerError("a char vocabulary holds single characters only")
        self._built_specials, self._built_unk = list(specials), unk  # as built, before any additions
        names = list(specials) + ([UNK] if unk and UNK not in specials else [])
        self._specials = {name: len(self.chars) + i for i, name in enumerate(names)}
        # Tokens added after the vocabulary was built (by fine-tuning) take the next ids, in order, so
        # every id a trained model knows keeps its meaning.
        self.added = [(text, bool(special)) for text, special in added]
        pieces = {c: i for i, c in enumerate(self.chars)}
        for offset, (text, special) in enumerate(self.added):
            if text in pieces or text in self._specials or (not special and len(text) != 1):
                raise TokenizerError(f"cannot add {text!r} to the char vocabulary: it is there already or not one char")
            if special:
                self._specials[text] = len(self.chars) + len(names) + offset
            else:
                pieces[text] = len(self.chars) + len(names) + offset
        self.unk_id = self._specials.get(UNK)
        self._lookup = np.full(max((ord(c) for c in pieces), default=0) + 1, -1, dtype=np.int64)
        for c, i in pieces.items():
            self._lookup[ord(c)] = i
        self._pieces = {i: c for c, i in pieces.items()}
        self._names = {i: name for name, i in self._specials.items()}
        matchable = [re.escape(n) for n in self._specials if n != UNK]
        self._special_pattern = re.compile("(" + "|".join(matchable) + ")") if matchable else None

    @property
    def vocab_size(self) -> int:
        return len(self._pieces) + len(self._specials)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        return self.encode_to_arrays([text])[0].tolist()

    def encode_plain(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def _with_added(self, chars: Iterable[str] = (), specials: Sequence[str] = ()) -> CharTokenizer:
        new = [(c, False) for c in sorted(set(chars)) if self._lookup_id(c) is None]
        new += [(name, True) for name in specials if name not in self._specials]
        if not new:
            return self
        return CharTokenizer(self.chars, self._built_specials, self._built_unk, self.added + new)

    def _lookup_id(self, char: str) -> int | None:
        code = ord(char)
        return int(self._lookup[code]) if code < len(self._lookup) and self._lookup[code] >= 0 else None

    def encode_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_with_specials(t) for t in texts]

    def _encode_with_specials(self, text: str) -> np.ndarray:
        if self._special_pattern is None:
            return self._encode_array(text)
        parts = self._special_pattern.split(text)
        # re.split with one group alternates text, special, text, ...
        arrays = [
            self._encode_array(p) if i % 2 == 0 else np.array([self._specials[p]], dtype=np.int64)
            for i, p in enumerate(parts)
            if p
        ]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    def _encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        inside = codes < len(self._lookup)
        ids = np.full(len(codes), -1, dtype=np.int64)
        ids[inside] = self._lookup[codes[inside]]
        unknown = ids < 0
        if unknown.any():
            if self.unk_id is None:
                first = int(np.argmax(unknown))
                raise UnknownCharacter(text[first], first)
            ids[unknown] = self.unk_id
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self._names.get(i) or self._pieces[i] for i in ids)
        except KeyError:
            raise outside_vocabulary(self.kind, self.vocab_size) from None

    def _identity(self) -> bytes:
        identity = [self.chars, self._specials] + ([self.added] if self.added else [])
        return json.dumps(identity, ensure_ascii=False).encode()

    def _save_files(self, folder: Path) -> dict:
        return {
            "chars": "".join(self.chars),
            "specials": [n for n in self._built_specials if n != UNK],
            "unk": self._built_unk or UNK in self._built_specials,
            "added": [[text, special] for text, special in self.added],
        }

    @classmethod
    def from_meta(cls, meta: dict, folder: Path) -> CharTokenizer:
        return cls(meta["chars"], meta.get("specials", ()), meta.get("unk", False), meta.get("added", ()))
