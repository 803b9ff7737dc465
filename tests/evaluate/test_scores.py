"""ROUGE-L equals the rouge-score library's own number, and hand-worked LCS values; exact match forgives
case, spacing and a trailing full stop, and nothing else."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from kiln.evaluate.scores import exact_match, normalize_answer, rouge_l

PAIRS = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("The cats were running in the garden", "A cat runs in gardens"),
    ("1. Preheat the oven.\n2. Mix flour and eggs.", "Mix eggs and flour, then preheat the oven"),
    ("Photosynthesis converts light into chemical energy.", "Plants eat sunlight."),
    ("yes", "Yes!"),
    ("An answer with words", ""),
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps over the lazy fox"),
]


@pytest.mark.parametrize(("reference", "prediction"), PAIRS)
def test_rouge_l_equals_rouge_score(reference, prediction):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(reference, prediction) == scorer.score(reference, prediction)["rougeL"].fmeasure


@pytest.mark.parametrize(
    ("reference", "prediction", "expected"),
    [
        # LCS "the cat on mat": 4 of 6 tokens each way, so P = R = F = 2/3.
        ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),
        # LCS 4; P = 4/4, R = 4/6, F = 2PR / (P + R) = 0.8.
        ("the cat sat on the mat", "the cat on mat", 0.8),
        # Reversed order: the LCS is one token, so P = R = F = 1/4.
        ("one two three four", "four three two one", 0.25),
        # Stemming: cats -> cat, running and runs -> run; LCS "cat run" = 2, P = 2/3, R = 2/4, F = 4/7.
        ("The cats were running", "a cat runs", 4 / 7),
        # Case and punctuation are not tokens.
        ("Hello, World!", "hello world", 1.0),
        ("some reference", "", 0.0),
    ],
)
def test_rouge_l_hand_worked(reference, prediction, expected):
    assert rouge_l(reference, prediction) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_is_symmetric_in_f_measure_and_bounded():
    reference, prediction = "a b c d e f", "a c e"
    assert rouge_l(reference, prediction) == pytest.approx(rouge_l(prediction, reference))
    assert 0.0 < rouge_l(reference, prediction) < 1.0


@pytest.mark.parametrize(
    ("reference", "prediction"),
    [
        ("Paris.", "  paris "),
        ("The answer is 4", "the answer is 4!"),
        ("New York", "new\n  york."),
        ("Blue", "BLUE ?"),
    ],
)
def test_exact_match_forgives_case_spacing_and_final_punctuation(reference, prediction):
    assert exact_match(reference, prediction)


@pytest.mark.parametrize(
    ("reference", "prediction"),
    [
        ("Paris", "Paris, France"),
        ("4", "four"),
        ("It's blue.", "Its blue."),
        ("Blue.", ".Blue"),
        ("Blue", ""),
    ],
)
def test_exact_match_keeps_everything_else(reference, prediction):
    assert not exact_match(reference, prediction)


def test_normalize_answer():
    assert normalize_answer("  The Answer\tis  PARIS. ! \n") == "the answer is paris"
