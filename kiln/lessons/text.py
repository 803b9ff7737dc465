"""The text a lesson learns from: a data-set name or file, read whole, refused in one line when too small."""

from __future__ import annotations

import os

from kiln.data.corpus import open_corpus
from kiln.errors import DataError


def lesson_text(spec: str, data_dir: str | os.PathLike | None, min_chars: int, max_chars: int | None = None) -> str:
    """All of `spec`'s text (its train split for data sets that have one), up to `max_chars`."""
    corpora = open_corpus(spec, data_dir)
    corpus = corpora.get("train") or corpora["all"]
    parts, size = [], 0
    for document in corpus.documents():
        for piece in document:
            parts.append(piece)
            size += len(piece)
            if max_chars and size >= max_chars:
                break
        if max_chars and size >= max_chars:
            break
    text = "".join(parts)[:max_chars] if max_chars else "".join(parts)
    if len(text) < min_chars:
        raise DataError(
            f"{spec}: {len(text):,} characters is too small for this lesson, which needs at least {min_chars:,}; "
            "give a longer text, or leave out --corpus for the lesson's own"
        )
    return text
