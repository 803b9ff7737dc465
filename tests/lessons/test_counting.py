"""Lesson 1's numerics: counts you can check by hand, rows that sum to 1, an NLL that torch agrees with."""

from __future__ import annotations

import ast
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kiln.cli import main
from kiln.lessons import counting
from kiln.lessons.catalog import LessonContext
from kiln.lessons.counting import (
    UNK,
    average_nll,
    build_vocabulary,
    count_bigrams,
    encode,
    most_likely_next,
    probability_table,
    sample,
    split_text,
    uniform_nll,
    unigram_nll,
    unigram_probabilities,
    unseen_characters,
)
from kiln.lessons.narrate import Narrator


def quiet_context(out: Path, data_dir, **kwargs) -> LessonContext:
    return LessonContext(Narrator(out, Console(file=io.StringIO(), width=100)), out, data_dir=data_dir, **kwargs)


@pytest.fixture(scope="module")
def shakespeare_model(shakespeare_text):
    train_text, heldout_text = split_text(shakespeare_text)
    vocabulary = build_vocabulary(train_text)
    train_ids, heldout_ids = encode(train_text, vocabulary), encode(heldout_text, vocabulary)
    counts = count_bigrams(train_ids, len(vocabulary))
    return vocabulary, train_ids, heldout_ids, counts, probability_table(counts)


def test_split_is_ninety_ten_in_order():
    train_text, heldout_text = split_text("abcdefghij" * 10)
    assert (len(train_text), len(heldout_text)) == (90, 10)
    assert train_text + heldout_text == "abcdefghij" * 10


def test_vocabulary_and_unseen_characters_become_unk():
    vocabulary = build_vocabulary("abba")
    assert vocabulary == ["a", "b", UNK]
    assert encode("abcz", vocabulary) == [0, 1, 2, 2]
    assert unseen_characters("abczc", vocabulary) == {"c": 2, "z": 1}


def test_bigram_counts_on_a_string_checked_by_hand():
    vocabulary = build_vocabulary("abbab")
    ids = encode("abbab", vocabulary)  # pairs: ab, bb, ba, ab
    assert count_bigrams(ids, len(vocabulary)) == [
        [0, 2, 0],  # after a: b twice
        [1, 1, 0],  # after b: a once, b once
        [0, 0, 0],  # UNK never occurs
    ]


def test_probability_table_with_and_without_add_one():
    counts = [[0, 2, 0], [1, 1, 0], [0, 0, 0]]
    assert probability_table(counts, smoothing=0.0) == [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    smoothed = probability_table(counts, smoothing=1.0)
    assert smoothed[0] == pytest.approx([1 / 5, 3 / 5, 1 / 5])
    assert smoothed[1] == pytest.approx([2 / 5, 2 / 5, 1 / 5])
    assert smoothed[2] == pytest.approx([1 / 3] * 3)  # a row never seen is uniform


def test_rows_sum_to_one_on_shakespeare(shakespeare_model):
    vocabulary, _, _, counts, table = shakespeare_model
    assert len(table) == len(vocabulary) == 66
    for row in table:
        assert math.fsum(row) == pytest.approx(1.0, abs=1e-12)
        assert min(row) > 0.0
    assert most_likely_next(table, vocabulary, "q", k=1)[0][0] == "u"


def test_average_nll_matches_torch_cross_entropy(shakespeare_model):
    torch = pytest.importorskip("torch")
    vocabulary, _, heldout_ids, _, table = shakespeare_model
    ids = heldout_ids[:20_000]
    log_table = torch.tensor(table, dtype=torch.float64).log()
    targets = torch.tensor(ids[1:])
    # Rows of log-probabilities are already normalised, so cross_entropy's log_softmax leaves them unchanged.
    expected = torch.nn.functional.cross_entropy(log_table[torch.tensor(ids[:-1])], targets).item()
    assert average_nll(table, ids) == pytest.approx(expected, rel=1e-12)


def test_nll_of_a_uniform_table_is_ln_v_and_of_an_impossible_pair_is_infinite():
    uniform = [[0.25] * 4 for _ in range(4)]
    assert average_nll(uniform, [0, 3, 1, 2, 2]) == pytest.approx(uniform_nll(4)) == pytest.approx(math.log(4))
    never_after_zero = [[0.0, 1.0], [0.5, 0.5]]
    assert average_nll(never_after_zero, [0, 1, 1]) == pytest.approx(-math.log(0.5) / 2)
    assert average_nll(never_after_zero, [1, 0, 0]) == math.inf


def test_seeded_sampling_is_reproducible_and_follows_the_table():
    vocabulary = ["a", "b", "c", UNK]
    table = [[0.0, 0.5, 0.5, 0.0], [0.2, 0.2, 0.6, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4]
    first = sample(table, vocabulary, "a", 300, seed=7)
    assert first == sample(table, vocabulary, "a", 300, seed=7)
    assert first != sample(table, vocabulary, "a", 300, seed=8)
    assert len(first) == 300 and set(first) <= {"a", "b", "c"}
    assert "aa" not in "a" + first and "ca" in first and "cb" not in first  # zero-probability pairs never appear
    deterministic = [[0.0, 1.0], [1.0, 0.0]]
    assert sample(deterministic, ["x", "y"], "x", 5, seed=0) == "yxyxy"


def test_shakespeare_counts_beat_blind_guessing(shakespeare_model):
    vocabulary, train_ids, heldout_ids, counts, table = shakespeare_model
    heldout = average_nll(table, heldout_ids)
    unigram = unigram_nll(unigram_probabilities(train_ids, len(vocabulary)), heldout_ids)
    assert average_nll(table, train_ids) < heldout < unigram < uniform_nll(len(vocabulary))
    # The figures docs/learn/1-counting.md quotes.
    assert heldout == pytest.approx(2.4820, abs=1e-4)
    assert uniform_nll(len(vocabulary)) == pytest.approx(4.1897, abs=1e-4)
    assert average_nll(probability_table(counts, smoothing=0.0), heldout_ids) == math.inf


def test_lesson_one_is_pure_python():
    source = Path(counting.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"numpy", "torch"}
    # Importing it and doing all its counting, sampling and scoring never loads NumPy either.
    script = (
        "import sys\n"
        "from kiln.lessons.counting import *\n"
        "v = build_vocabulary('to be or not to be')\n"
        "t = probability_table(count_bigrams(encode('to be or not', v), len(v)))\n"
        "average_nll(t, encode('not to be', v)); sample(t, v, 't', 20, 1)\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_corpus_too_small_is_one_line(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be, that is the question\n" * 20)
    assert main(["learn", "1", "--corpus", str(small), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("kiln: error: ")
    assert "small.txt: 820 characters is too small for this lesson, which needs at least 10,000" in err


def test_quick_run_prints_its_figures_and_writes_the_heat_map(tmp_path, mirror):
    result = counting.run(quiet_context(tmp_path, mirror, quick=True))
    assert result["heatmap"] == tmp_path / "bigram_heatmap.png"
    assert result["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["characters"] == counting.QUICK_CHARS
    assert result["train_characters"] == 180_000
    assert result["train_nll"] < result["heldout_nll"] < result["unigram_heldout_nll"] < result["uniform_nll"]
    assert result["uniform_nll"] == pytest.approx(math.log(result["vocab_size"]))
    assert result["unsmoothed_heldout_nll"] == math.inf
    assert len(result["sample"]) == counting.SAMPLE_LENGTH


def test_held_out_characters_never_seen_in_training_are_scored_as_unk(tmp_path, mirror):
    corpus = tmp_path / "odd.txt"
    corpus.write_text("abcab cabba " * 1_500 + "ab%c ~ab" * 200)  # '%' and '~' only in the held-out tenth
    result = counting.run(quiet_context(tmp_path, mirror, corpus=str(corpus)))
    assert result["vocab_size"] == 5  # a, b, c, space, <unk>
    assert result["unseen_heldout_characters"] == 400
    assert math.isfinite(result["heldout_nll"])  # smoothing leaves <unk> a little probability
