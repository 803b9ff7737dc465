"""`kiln learn`: the list of lessons, and one clear line for a lesson or a corpus that will not do."""

from __future__ import annotations

import pytest

from kiln.cli import main
from kiln.errors import DataError
from kiln.lessons.catalog import LESSONS
from kiln.lessons.text import lesson_text


def test_learn_lists_every_lesson_with_its_page(capsys):
    assert main(["learn"]) == 0
    out = capsys.readouterr().out
    for lesson in LESSONS.values():
        assert lesson.title in out
    assert "kiln learn N" in out


@pytest.mark.parametrize("number", ["0", "6", "-1"])
def test_a_lesson_that_does_not_exist_is_one_line(capsys, number):
    assert main(["learn", number]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kiln: error: there is no lesson {number}: lessons are 1 to 5 (`kiln learn` lists them)"


def test_lesson_text_refuses_a_corpus_too_small(tmp_path, mirror):
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be")
    with pytest.raises(
        DataError, match=r"small.txt: 18 characters is too small for this lesson, which needs at least 1,000"
    ):
        lesson_text(str(small), mirror, min_chars=1000)
    assert len(lesson_text("tinyshakespeare", mirror, min_chars=1000, max_chars=5000)) == 5000


def test_corpus_for_a_lesson_that_reads_none_is_one_line(capsys, tmp_path):
    assert main(["learn", "3", "--corpus", "tinyshakespeare", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "kiln: error: lesson 3 reads no corpus (it works on one fixed sentence); drop --corpus"
    )


def test_lesson_5_refuses_a_corpus_too_small_before_any_work(capsys, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n" * 100)
    assert main(["learn", "5", "--corpus", str(small), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "1,900 characters is too small for this lesson" in err and "\n" not in err
