"""Where a run's numbers go: `metrics.jsonl` (one JSON object per evaluation) always, and the same
scalars as TensorBoard event files with `--set log=tensorboard`.

On resume the log is cut back to the checkpoint's step, so it reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.atomic import atomic_file
from kiln.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    def __init__(self, run_dir: Path, step: int, log: str = "jsonl"):
        self.path = Path(run_dir) / METRICS_FILE
        _truncate(self.path, step)
        self.writer = None
        if log == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--set log=tensorboard needs the tensorboard package: pip install tensorboard "
                    "(or pip install -e '.[tensorboard]')"
                ) from None
            # purge_step drops events a resumed run is about to write again.
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=step or None)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the log, not just the errno
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _step_of(line: str) -> float:
    """A record's step; a line torn by a kill in the middle of its write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _truncate(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from (all of them for a new run)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step] if step else []
    # Swapped in whole: a kill while it is rewritten must not leave the log empty or cut.
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
