"""How a lesson talks: headed steps, figures, tables and PNG plots, in colour on a terminal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


class Narrator:
    """Prints a lesson's steps (rich markup) and saves its plots into `out_dir`."""

    def __init__(self, out_dir: Path, console: Console | None = None):
        self.out_dir = Path(out_dir)
        self.console = console or Console(highlight=False)
        self.steps = 0

    def title(self, text: str) -> None:
        self.console.rule(f"[bold magenta]{text}")

    def step(self, text: str) -> None:
        """A numbered step heading."""
        self.steps += 1
        self.console.print(f"\n[bold cyan]Step {self.steps}. {text}[/]")

    def say(self, text: str) -> None:
        self.console.print(text)

    def show(self, label: str, value: object) -> None:
        """One named figure: `label: value`."""
        self.console.print(f"  [green]{label}[/]: {value}")

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
        table = Table(*columns, title=title, box=None, pad_edge=False, header_style="bold")
        for row in rows:
            table.add_row(*(str(cell) for cell in row))
        self.console.print(table)

    def plot(self, figure, name: str) -> Path:
        """Save a matplotlib figure as out_dir/name.png, close it, and say where it is."""
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        self.console.print(f"  [yellow]plot[/]: {path}")
        return path


def new_figure(width: float = 6.0, height: float = 4.0):
    """A matplotlib figure and axis drawn off screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))
