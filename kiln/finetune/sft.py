"""The supervised fine-tuning loop: masked next-token loss on answers, AdamW with warmup and cosine
decay, validation loss on the whole val split, the best weights kept, and an optional early stop."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.errors import ConfigError, KilnError
from kiln.finetune.examples import IGNORE, EpochBatches, Example, in_batches
from kiln.train.optim import OptimConfig, build_optimizers, lr_factor, set_learning_rates

METRICS_FILE = "metrics.jsonl"
PACE_STEPS = 10  # a --max-time run sets its schedule from the pace of its first steps


@dataclass
class FinetuneConfig:
    lr: float | None = None  # None: see default_lr
    min_lr_ratio: float = 0.1
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    epochs: float | None = None  # None: 2 epochs unless --max-iters or --max-time is given
    max_iters: int | None = None
    max_time: float | None = None  # seconds
    eval_interval: int = 50
    early_stop: int = 0  # stop after this many evaluations without a better val loss; 0 = never
    prompt_loss: bool = False  # also learn to predict the prompt tokens
    block_size: int | None = None  # None: the base model's context
    template: str | None = None  # None: chat for chat-format data, alpaca otherwise
    seed: int = 1337
    split_seed: int = 123

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs} must be above 0")


def default_lr(model: nn.Module, lora: bool) -> float:
    """Small models need (and survive) larger steps: 1e-3 full / 5e-3 LoRA below 10M weights, as measured
    on the demo's model (docs/finetune.md); 5e-5 / 5e-4 above, in line with GPT-2-sized recipes."""
    small = sum(p.numel() for p in model.parameters()) < 10_000_000
    if lora:
        return 5e-3 if small else 5e-4
    return 1e-3 if small else 5e-5


@dataclass
class FinetuneResult:
    steps: int
    epochs: float
    seconds: float
    val_loss_before: float
    best_val_loss: float
    stopped_early: bool


@torch.no_grad()
def masked_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over every answer token of `examples` (each token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, labels in in_batches(examples, batch_size, pad_id):
        logits, _ = model(inputs.to(device))
        labels = labels.to(device)
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def run_sft(
    model: nn.Module,
    train: list[Example],
    val: list[Example],
    config: FinetuneConfig,
    pad_id: int,
    out: Path,
    save_best: Callable[[], None],
    on_step: Callable[[int, float], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    lora: bool = False,
) -> FinetuneResult:
    """Train `model` (its trainable parameters) on `train`; call `save_best` whenever val loss improves."""
    if not val:
        raise KilnError("the val split is empty; use more data or a larger val fraction")
    torch.manual_seed(config.seed)
    lr = config.lr or default_lr(model, lora)
    optim = OptimConfig(
        lr=lr, min_lr=lr * config.min_lr_ratio, warmup_iters=config.warmup_iters, weight_decay=config.weight_decay
    )
    optimizers = build_optimizers(model, optim)
    batches = EpochBatches(train, config.batch_size, pad_id, seed=config.seed)
    limits = [config.max_iters] if config.max_iters else []
    if config.epochs or not (config.max_iters or config.max_time):
        limits.append(math.ceil((config.epochs or 2) * batches.batches_per_epoch))
    total = min(limits) if limits else None
    if total and on_total:
        on_total(total)
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / METRICS_FILE).open("w")

    def evaluate(step: int) -> float:
        loss = masked_loss(model, val, pad_id, config.batch_size * 2)
        metrics.write(json.dumps({"step": step, "epoch": step / batches.batches_per_epoch, "val_loss": loss}) + "\n")
        metrics.flush()
        return loss

    start = time.perf_counter()
    before = best = evaluate(0)
    save_best()
    eval_seconds = time.perf_counter() - start
    step, since_best, stopped_early = 0, 0, False
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while total is None or step < total:
        if config.max_time and time.perf_counter() - start >= config.max_time:
            break
        set_learning_rates(optimizers, lr_factor(step, total or 10**9, optim))
        inputs, labels = next(batches)
        logits, _ = model(inputs.to(device))
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=IGNORE
        )
        loss.backward()
        if not math.isfinite(loss.item()):
            raise KilnError(f"loss became {loss.item()} at step {step + 1}; try a lower learning rate (--set lr=...)")
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip, foreach=True)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if on_step:
            on_step(step, loss.item())
        if config.max_time and step == PACE_STEPS:
            # Fit the schedule to the time left, counting the evaluations still to come.
            per_step = (time.perf_counter() - start - eval_seconds) / step
            per_step += eval_seconds / config.eval_interval
            by_time = step + int((config.max_time - (time.perf_counter() - start)) / per_step)
            total = min(total, by_time) if total else by_time
            if on_total:
                on_total(total)
        done = total is not None and step >= total
        if step % config.eval_interval == 0 or done:
            began = time.perf_counter()
            val_loss = evaluate(step)
            if val_loss < best:
                best, since_best = val_loss, 0
                save_best()
            else:
                since_best += 1
            eval_seconds = time.perf_counter() - began
            if config.early_stop and since_best >= config.early_stop:
                stopped_early = True
                break
    if step % config.eval_interval and not stopped_early and not (total is not None and step >= total):
        val_loss = evaluate(step)  # stopped by the clock between evaluations
        if val_loss < best:
            best = val_loss
            save_best()
    metrics.close()
    return FinetuneResult(
        step, step / batches.batches_per_epoch, time.perf_counter() - start, before, best, stopped_early
    )
