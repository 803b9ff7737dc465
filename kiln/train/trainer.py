"""Pretraining as a stage of the training engine: random windows of the token files in, next-token
loss on every position, and evaluation on fixed batches of train and val windows.

A run folder holds `last/` and `best/` checkpoints (with everything resuming needs), `metrics.jsonl`
and, at the end, `loss.png`. Resuming from `last/` continues so exactly that, on CPU, the losses after a
resume equal an uninterrupted run's bit for bit, on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from kiln.checkpoint import TrainingState, is_checkpoint, load_checkpoint, save_checkpoint
from kiln.data.loaders import RandomWindows, StepWindows
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

__all__ = ["METRICS_FILE", "TrainConfig", "TrainResult", "TrainingDiverged", "estimate_loss", "planned_steps", "train"]


def _fixed_batches(tokens, config: GPTConfig, train: TrainConfig, seed: int, label: str) -> list:
    loader = RandomWindows(tokens, config.block_size, train.batch_size, seed=seed, label=label)
    return [next(loader) for _ in range(train.eval_batches)]


@torch.no_grad()
def estimate_loss(model: GPT, batches: list, device: torch.device, amp: torch.dtype | None = None) -> float:
    """Mean loss over fixed batches of windows."""
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        losses = [model(x.to(device), targets=y.to(device))[1].item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


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
    windows = StepWindows(
        train_tokens, model_config.block_size, train_config.rows_per_step, train_config.seed, f"{data.folder} train"
    )
    train_eval = _fixed_batches(train_tokens, model_config, train_config, train_config.seed + 1, "train")
    val_eval = _fixed_batches(
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
        steps_per_epoch=len(train_tokens) / tokens_per_step,
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
