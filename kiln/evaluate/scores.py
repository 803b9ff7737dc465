"""Scores of a generated answer against its reference: ROUGE-L (through Google's `rouge-score`) and
normalised exact match."""

from __future__ import annotations

from functools import cache

from kiln.errors import KilnError

# Sentence punctuation that a reference may end with and a correct answer may leave off, or the reverse.
TRAILING_PUNCTUATION = ".,;:!?…"


@cache
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise KilnError("scoring answers needs the rouge-score package: pip install rouge-score") from None
    # rougeL, not rougeLsum: an answer is scored as one token sequence, its newlines ignored. The Porter
    # stemmer (as Super-NaturalInstructions scores it) lets "runs" match "running".
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure in [0, 1]: from the longest common subsequence of the two token lists.

    rouge-score lowercases and keeps only [a-z0-9] runs as tokens, so punctuation never counts, and text
    without ASCII letters or digits has no tokens and scores 0.
    """
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace runs made single spaces, surrounding whitespace and trailing sentence
    punctuation removed: what exact match compares."""
    return " ".join(text.casefold().split()).rstrip(TRAILING_PUNCTUATION + " ")


def exact_match(reference: str, prediction: str) -> bool:
    """True when the two texts are equal after `normalize_answer`."""
    return normalize_answer(reference) == normalize_answer(prediction)
