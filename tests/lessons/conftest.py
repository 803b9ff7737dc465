"""Lessons run quietly in tests: their narration goes to a string, their files to a temporary folder."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kiln.lessons.catalog import LessonContext, run_lesson
from kiln.lessons.narrate import Narrator


@pytest.fixture(scope="session")
def run_quick_lesson(tmp_path_factory, mirror):
    """run(number) -> (out folder, figures): the lesson once in quick mode, with its own user cache."""

    def run(number: int):
        out = tmp_path_factory.mktemp(f"learn{number}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp(f"cache{number}")))
            narrator = Narrator(out, Console(file=io.StringIO(), width=120))
            figures = run_lesson(number, LessonContext(narrator, out, data_dir=mirror, quick=True))
        return out, figures

    return run
