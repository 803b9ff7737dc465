"""Cut text where GPT-2-style pre-tokenizers always split, so pieces encode exactly as the whole does."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_SAFE_CUT = re.compile(r"\s(?=\S)")  # searched in reversed text: a space after a non-space
_SAFE_CUT_FORWARD = re.compile(r"(?<=\S)\s")


def safe_chunks(document: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """Re-cut a document into pieces of at most about `size` characters that end where the GPT-2
    pre-tokenizer always splits (a non-space followed by a space), so encoding piece by piece equals
    encoding the document whole."""
    carry = ""
    for text in document:
        carry += text
        while len(carry) >= size:
            cut = _safe_cut(carry, size)
            if cut is None:
                if len(carry) < 16 * size:
                    break  # wait for more text: the next whitespace may come soon
                cut = len(carry)  # no whitespace in 16 pieces' worth: exactness at this one seam is lost
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def _safe_cut(text: str, size: int) -> int | None:
    """The last safe cut in text[:size], else the first one after it, else None."""
    head = text[max(0, size - 65536) : size]
    match = _SAFE_CUT.search(head[::-1])
    if match:
        return max(0, size - 65536) + len(head) - 1 - match.start()
    later = _SAFE_CUT_FORWARD.search(text, size)
    return later.start() if later else None
