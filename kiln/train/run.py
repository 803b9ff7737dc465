"""What `kiln train` does around the loop: find or prepare the data, build the configs, show progress,
and report (summary, loss.png, a sample) at the end."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.config import apply_settings
from kiln.data.corpus import ReadOptions, open_corpus
from kiln.data.fetch import cache_dir
from kiln.data.prepare import prepare_corpus
from kiln.data.prepared import PreparedCorpus, is_prepared_dir
from kiln.data.tokenizers import tokenizer_from_spec
from kiln.errors import ConfigError
from kiln.model.gpt import GPTConfig
from kiln.model.presets import preset_config
from kiln.train.optim import OptimConfig
from kiln.train.trainer import METRICS_FILE, TrainConfig

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90s', '3m', '1.5h' or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"--max-time {text}: write a duration such as 90s, 3m or 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def training_data(spec: str, tokenizer: str | None, data_dir: str | os.PathLike | None) -> PreparedCorpus:
    """A prepared folder as it is, or a data-set name / file prepared on the fly into the user cache.

    The cache folder is named by the data and tokenizer asked for; `prepare` itself reuses it while the
    source's checksum is unchanged, so a second run starts at once.
    """
    if is_prepared_dir(Path(spec)):
        expected = tokenizer_from_spec(tokenizer, data_dir) if tokenizer and tokenizer != "char" else None
        return PreparedCorpus.open(spec, expect_tokenizer=expected)
    tokenizer = tokenizer or "gpt2"
    source = str(Path(spec).resolve()) if Path(spec).exists() else spec
    key = hashlib.sha256(f"{source}\0{tokenizer}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).name or spec)[:40]
    folder = cache_dir() / "prepared" / f"{name}-{tokenizer.split(':')[0]}-{key}"
    return prepare_corpus(open_corpus(spec, data_dir, ReadOptions()), tokenizer, folder, data_dir=data_dir)


@dataclass
class RunSettings:
    model: GPTConfig
    optim: OptimConfig
    train: TrainConfig


def build_settings(preset: str, vocab_size: int, settings: dict, limits: dict) -> RunSettings:
    """Preset shape + the data's vocabulary + file/--set settings + the command's limits."""
    model = preset_config(preset, vocab_size=vocab_size)
    model, optim, train = apply_settings([model, OptimConfig(), TrainConfig()], {**settings, **limits})
    return RunSettings(model, optim, train)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png with the train and val curves from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    axis.plot(steps, [r["train_loss"] for r in rows], label="train", marker="o", markersize=3)
    axis.plot(steps, [r["val_loss"] for r in rows], label="val", marker="o", markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy loss")
    axis.set_title(f"{run_dir.name}: best val {min(r['val_loss'] for r in rows):.3f}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = run_dir / "loss.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
