"""Progress bars with rate and ETA for long work (rich), silent when $KILN_QUIET is set and on every
process of a data-parallel run but rank 0's."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kiln.distributed import launched_world

QUIET_ENV = "KILN_QUIET"


class _CountAndRate(ProgressColumn):
    """'12.3M chars, 4.1M chars/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = f", {_short(task.speed)} {self.unit}/s" if task.speed else ""
        return Text(f"{_short(task.completed)} {self.unit}{rate}", style="progress.data.speed")


def _short(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"


@contextmanager
def progress_bar(label: str, total: float | None, unit: str = "") -> Iterator[Callable[..., None]]:
    """Yield `advance(n, label=None, total=None)`; draws a transient bar with rate and ETA on stderr when
    it is a terminal. A new `label` replaces the description (e.g. to show the current loss), a new
    `total` the length (once a time-limited run knows how many steps fit)."""
    if os.environ.get(QUIET_ENV) or not sys.stderr.isatty() or not launched_world().is_main:
        yield lambda n, label=None, total=None: None
        return
    columns: list = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [_CountAndRate(unit)]
    columns.append(TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)

        def advance(n: float, label: str | None = None, total: float | None = None) -> None:
            changes = {"description": label} if label else {}
            bar.update(task, advance=n, **changes, **({"total": total} if total else {}))

        yield advance
