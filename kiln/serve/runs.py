"""What the runs page shows of a folder of training runs: each run's settings, its checkpoints, and its
metrics.jsonl rows (read while the run may still be writing them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kiln.checkpoint import STATE_JSON, is_adapter, is_checkpoint, read_info
from kiln.train.metrics import METRICS_FILE

CHECKPOINT_NAMES = ("best", "last")
# config.json keys that say what the folder is rather than how the run was set up.
FORMAT_KEYS = ("kiln", "format_version", "created_by", "base_sha256")


def is_run(folder: Path) -> bool:
    """A run folder holds metrics.jsonl or a best/ or last/ checkpoint (or adapter)."""
    if not folder.is_dir():
        return False
    return (folder / METRICS_FILE).is_file() or any(_kind(folder / name) for name in CHECKPOINT_NAMES)


def run_folder(runs_dir: Path | None, name: str) -> Path | None:
    """The run called `name`: a direct child of `runs_dir` (never a path out of it), or None."""
    if runs_dir is None or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    folder = Path(runs_dir) / name
    try:
        # A symlink that leads out of runs_dir is refused too.
        inside = folder.resolve().parent == Path(runs_dir).resolve()
    except OSError:
        return None
    return folder if inside and is_run(folder) else None


def list_runs(runs_dir: Path | None) -> list[dict]:
    """Every run directly under `runs_dir`, the most recently changed first ([] without a runs_dir)."""
    if runs_dir is None or not Path(runs_dir).is_dir():
        return []
    runs = [describe_run(folder) for folder in Path(runs_dir).iterdir() if run_folder(runs_dir, folder.name)]
    return sorted(runs, key=lambda run: (-run["updated"], run["name"]))


def describe_run(folder: Path) -> dict:
    """A run's name, settings (from its newest checkpoint's config.json), checkpoints (its own and those of
    runs nested one level down, such as a LoRA fine-tune in RUN/lora) and last metrics row."""
    checkpoints = run_checkpoints(folder)
    newest = max(checkpoints, key=lambda c: c["step"] if c["step"] is not None else -1, default=None)
    own = [c for c in checkpoints if "/" not in c["name"]]
    source = folder / (own or checkpoints)[0]["name"] if checkpoints else None
    info = read_info(source) if source else {}
    rows = read_metrics_after(folder)
    return {
        "name": folder.name,
        "settings": {key: value for key, value in info.items() if key not in FORMAT_KEYS},
        "checkpoints": checkpoints,
        "step": newest["step"] if newest else None,
        "last_metrics": rows[-1] if rows else None,
        "updated": _changed_at(folder),
    }


def run_checkpoints(folder: Path) -> list[dict]:
    """The run's best/ and last/ and those of its sub-runs ("lora/best"), each with kind, step and best val loss."""
    found = []
    places = [folder] + sorted(
        child for child in folder.iterdir() if child.is_dir() and child.name not in CHECKPOINT_NAMES
    )
    for place in places:
        for name in CHECKPOINT_NAMES:
            kind = _kind(place / name)
            if kind:
                progress = _progress(place / name)
                relative = (place / name).relative_to(folder).as_posix()
                found.append(
                    {
                        "name": relative,
                        "kind": kind,
                        "step": progress.get("step"),
                        "best_val_loss": progress.get("best_val_loss"),
                    }
                )
    return found


def read_metrics_after(folder: Path, after: float | None = None) -> list[dict]:
    """The metrics.jsonl rows with a step after `after` (all rows without it). A line the run is still
    writing (torn, not yet JSON) is left for the next read."""
    try:
        text = (folder / METRICS_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        is_row = isinstance(row, dict) and isinstance(row.get("step"), int | float)
        if is_row and (after is None or row["step"] > after):
            rows.append(_finite(row))
    return rows


def _finite(row: dict) -> dict:
    """JSON has no NaN or infinity (a diverged run logs them): they go to the page as null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}


def _kind(folder: Path) -> str | None:
    if is_checkpoint(folder):
        return "checkpoint"
    return "adapter" if is_adapter(folder) else None


def _progress(folder: Path) -> dict:
    try:
        progress = json.loads((folder / STATE_JSON).read_text()).get("progress", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return progress if isinstance(progress, dict) else {}


def _changed_at(folder: Path) -> float:
    """When the run last wrote something: its metrics log, else the folder itself."""
    for path in (folder / METRICS_FILE, folder):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0
