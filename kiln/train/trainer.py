"""Pretraining as a stage of the training engine: windows of the token files in (at random offsets, or,
for a run counted in epochs, the non-overlapping windows reshuffled each epoch), next-token loss on
every position, and evaluation on fixed batches of train and val windows: all of a split's
non-overlapping windows when they fit in `eval_batches` batches, so a small val split is scored whole.

A run folder holds `last/` and `best/` checkpoints (with everything resuming needs), `metrics.jsonl`
and, at the end, `loss.png`. Resuming from `last/` continues so exactly that, on CPU, the losses after a
resume equal an uninterrupted run's bit for bit, on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kiln.checkpoint import TrainingState, is_checkpoint, load_checkpoint, save_checkpoint
from kiln.data.loaders import EpochWindows, RandomWindows, StepWindows, stride_starts, windows_at
from kiln.data.prepared import PreparedCorpus
from kiln.errors import ConfigError
from kiln.model.gpt import GPT, GPTConfig
from kiln.train.engine import (
    METRICS_FILE,
    Stage,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    planned_steps,
    train_model,
)
from kiln.train.optim import OptimConfig

__all__ = [
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "estimate_loss",
    "evaluation_batches",
    "planned_steps",
    "pretraining_rows",
    "steps_per_epoch",
    "train",
]


def pretraining_rows(tokens, config: GPTConfig, train: TrainConfig, label: str = "") -> StepWindows:
    """The training rows: for a run counted in epochs the non-overlapping windows, reshuffled each epoch,
    so an epoch is one pass over the text; otherwise windows at random offsets."""
    rows = EpochWindows if train.epochs else StepWindows
    return rows(tokens, config.block_size, train.rows_per_step, train.seed, label)


def steps_per_epoch(rows: StepWindows) -> float:
    """Steps in one pass over the training text: whole ones for epoch rows, else tokens / tokens per step."""
    if isinstance(rows, EpochWindows):
        return rows.steps_per_epoch
    return len(rows.tokens) / (rows.rows_per_step * rows.block_size)


def evaluation_batches(
    tokens, config: GPTConfig, train: TrainConfig, seed: int, label: str, windows_only: bool = False
) -> list:
    """The fixed batches a split is scored on at every evaluation. When the split's non-overlapping
    windows fit in `eval_batches` batches (a small val split) they are all of them, so the score is
    the split's whole loss, the same number any other program computes on those windows. Otherwise
    `eval_batches` batches of windows at random offsets, or, with `windows_only` (a run trained on the
    non-overlapping windows), of those windows."""
    starts = stride_starts(len(tokens), config.block_size)
    wanted = train.eval_batches * train.batch_size
    if not len(starts) or (len(starts) > wanted and not windows_only):
        # (RandomWindows also refuses a split shorter than one window.)
        loader = RandomWindows(tokens, config.block_size, train.batch_size, seed=seed, label=label)
        return [next(loader) for _ in range(train.eval_batches)]
    if len(starts) > wanted:
        starts = np.sort(np.random.default_rng(seed).choice(starts, wanted, replace=False))
    chunks = np.split(starts, range(train.batch_size, len(starts), train.batch_size))
    return [windows_at(tokens, chunk, config.block_size) for chunk in chunks if len(chunk)]


@torch.no_grad()
def estimate_loss(model: GPT, batches: list, device: torch.device, amp: torch.dtype | None = None) -> float:
    """Mean loss per token over fixed batches of windows (a short last batch weighs by its windows)."""
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        losses = [model(x.to(device), targets=y.to(device))[1].item() * len(x) for x, y in batches]
    model.train(was_training)
    return sum(losses) / sum(len(x) for x, _ in batches)


def train(
    model_config: GPTConfig,
    optim_config: OptimConfig,
    train_config: TrainConfig,
    data: PreparedCorpus,
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_estimate: Callable[[int, float], None] | None = None,
    init_model: GPT | None = None,
    info: dict | None = None,
) -> TrainResult:
    """Train a GPT on prepared data into `run_dir`, from random weights or `init_model`'s.

    `on_step(step, loss)` is called after every step; `on_estimate(total_steps, seconds_left)` once the
    first 10 steps have been timed, and again whenever the pace is measured anew. `info` is recorded in
    every checkpoint's config.json.
    """
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    if init_model is not None and not resume:
        model.load_state_dict(init_model.state_dict())
    train_tokens = data.tokens("train")
    windows = pretraining_rows(train_tokens, model_config, train_config, f"{data.folder} train")
    by_epoch = isinstance(windows, EpochWindows)
    train_eval = evaluation_batches(train_tokens, model_config, train_config, train_config.seed + 1, "train", by_epoch)
    val_eval = evaluation_batches(
        data.tokens("val"), model_config, train_config, train_config.seed + 2, f"{data.folder} val"
    )
    tokens_per_step = train_config.rows_per_step * model_config.block_size
    saved_info = {"optim": asdict(optim_config), "data": str(data.folder), **(info or {})}

    def evaluate(module: GPT) -> dict[str, float]:
        device = next(module.parameters()).device
        return {
            "train_loss": estimate_loss(module, train_eval, device),
            "val_loss": estimate_loss(module, val_eval, device),
        }

    def save(folder: Path, module: GPT, state: TrainingState | None) -> None:
        save_checkpoint(folder, module, data.tokenizer, state, saved_info)

    def restore(folder: Path, module: GPT) -> TrainingState:
        return _restore(folder, module, model_config, data)

    stage = Stage(
        rows=windows.rows,
        batch=windows.batch,
        evaluate=evaluate,
        save=save,
        restore=restore,
        steps_per_epoch=steps_per_epoch(windows),
        tokens_per_step=tokens_per_step,
    )
    return train_model(model, optim_config, train_config, stage, run_dir, resume, on_step, on_estimate)


def _restore(folder: Path, model: GPT, model_config: GPTConfig, data: PreparedCorpus) -> TrainingState:
    if not is_checkpoint(folder):
        raise ConfigError(f"{folder}: not a Kiln checkpoint, nothing to resume; drop --resume to start a new run")
    checkpoint = load_checkpoint(folder)
    if checkpoint.model.config != model_config:
        saved, asked = checkpoint.model.config.to_dict(), model_config.to_dict()
        differs = ", ".join(f"{k} {saved[k]} vs {asked[k]}" for k in saved if saved[k] != asked[k])
        raise ConfigError(
            f"{folder}: the checkpoint's model config disagrees ({differs}); resume with the same settings"
        )
    if checkpoint.tokenizer is None or checkpoint.tokenizer.fingerprint() != data.tokenizer.fingerprint():
        raise ConfigError(f"{folder}: was trained with another tokenizer than {data.folder} uses")
    if checkpoint.state is None:
        raise ConfigError(f"{folder}: holds weights but no training state, so it cannot be resumed")
    model.load_state_dict(checkpoint.model.state_dict())
    return checkpoint.state
