"""The words a model has read: counted from its training text while it is prepared (and from its
fine-tuning examples), kept beside its tokenizer as words.txt, so decoding can hold the model to words it
knows (kiln.generate.known_words). A word is a run of the letters a-z, case folded: "Don't" is "don" and
"t", "naïve" is "na" and "ve", so any text can be read the same way when a word is checked."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from kiln.atomic import atomic_file
from kiln.errors import TokenizerError

WORDS_FILE = "words.txt"
WORD = re.compile(r"[a-z]+")
# A web-scale corpus has millions of distinct strings (typos, ids, URLs): when the count holds this many,
# the ones seen once are let go, as word2vec's vocabulary building does; words.txt keeps the commonest.
PRUNE_AT = 2_000_000
MAX_SAVED = 500_000


def words_of(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order."""
    return WORD.findall(text.lower())


class WordCounter:
    """Counts the words of text given piece by piece, in bounded memory."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})

    def add(self, text: str) -> None:
        self.counts.update(words_of(text))
        if len(self.counts) >= PRUNE_AT:
            self.counts = Counter({w: n for w, n in self.counts.items() if n > 1})

    def add_all(self, texts: Iterable[str]) -> WordCounter:
        for text in texts:
            self.add(text)
        return self


def save_words(counts: dict[str, int], folder: Path) -> None:
    """words.txt in `folder`: one `word count` line each, commonest first (at most MAX_SAVED words)."""
    common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MAX_SAVED]
    with atomic_file(Path(folder) / WORDS_FILE) as tmp:
        tmp.write_text("".join(f"{word} {count}\n" for word, count in common), encoding="utf-8")


def load_words(folder: Path) -> dict[str, int] | None:
    """The counts in `folder`/words.txt; None when there is no such file (a tokenizer saved without it)."""
    path = Path(folder) / WORDS_FILE
    if not path.is_file():
        return None
    counts = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 at byte {e.start:,}; delete it or save it again") from None
    for number, line in enumerate(lines, 1):
        word, _, count = line.partition(" ")
        if not WORD.fullmatch(word) or not count.isdigit():
            raise TokenizerError(
                f"{path}:{number}: {line[:40]!r} is not a 'word count' line (a-z letters, a space, a number); "
                "fix the line or delete the file"
            )
        counts[word] = int(count)
    return counts
