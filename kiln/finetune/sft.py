"""Supervised fine-tuning as a stage of the training engine: padded instruction examples in, the
next-token loss on answer tokens only (normalised by the answer tokens of the whole step, on every
rank together), validation loss over the whole val split, and the loss before training reported.

The output head runs only at the positions that carry loss: prompt and padding positions are masked,
and on instruction data (a fifth of the positions are answers) the head over a 50k vocabulary was
about half of a GPT-2-sized LoRA step. The loss is the same sum over the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.checkpoint import TrainingState
from kiln.config import apply_settings
from kiln.errors import ConfigError, KilnError
from kiln.finetune.examples import Example, ExampleSteps, in_batches
from kiln.model.gpt import IGNORE
from kiln.train.engine import Stage, TrainConfig, TrainResult, train_model
from kiln.train.optim import OptimConfig

DEFAULT_EPOCHS = 2  # when no limit is given
KEPT_WEIGHTS = ("best", "last")  # the run's folders that FinetuneConfig.keep may name


@dataclass
class FinetuneConfig:
    """What fine-tuning adds to the engine's TrainConfig: its optimiser recipe and how examples are built."""

    lr: float | None = None  # None: see default_lr
    min_lr_ratio: float = 0.1
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompt_loss: bool = False  # also learn to predict the prompt tokens
    block_size: int | None = None  # None: the base model's context
    template: str | None = None  # None: chat for chat-format data, alpaca otherwise
    split_seed: int = 123
    # Word-swapped copies of each training example (kiln/finetune/augment.py): they teach a small model
    # to answer with the question's own words. 0 = none; the demo uses 8.
    word_swaps: int = 0
    # Each original training example this many times (the demo uses 3, beside 8 word-swapped copies): the
    # copies teach the form of an answer, the originals its facts.
    original_copies: int = 1
    # Which weights the run gives back: "best" (the lowest val answer loss) or "last" (the final step). A small
    # model that learns its examples by heart answers them better while its val loss rises, so the demo's
    # last stage keeps "last".
    keep: str = "best"

    def __post_init__(self) -> None:
        if self.word_swaps < 0 or self.original_copies < 1:
            raise ConfigError(
                f"word_swaps={self.word_swaps}, original_copies={self.original_copies}: "
                "word_swaps must be 0 or more and original_copies 1 or more"
            )
        if self.keep not in KEPT_WEIGHTS:
            raise ConfigError(f"keep={self.keep!r}: use one of {', '.join(KEPT_WEIGHTS)}")

    def optim(self, lr: float) -> OptimConfig:
        return OptimConfig(
            lr=lr,
            min_lr=lr * self.min_lr_ratio,
            warmup_iters=self.warmup_iters,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
        )


def finetune_settings(settings: dict) -> tuple[FinetuneConfig, TrainConfig]:
    """Fine-tuning's configs with `settings` applied: smaller batches and more frequent evaluation than
    pretraining's defaults, and two epochs unless a limit is given."""
    config, train = apply_settings([FinetuneConfig(), TrainConfig(batch_size=8, eval_interval=50)], settings)
    if not train.has_limit():
        train.epochs = DEFAULT_EPOCHS
    return config, train


def default_lr(model: nn.Module, lora: bool) -> float:
    """Small models need (and survive) larger steps: 1e-3 full / 5e-3 LoRA below 10M weights, as measured
    on the demo's model (docs/finetune.md); 5e-5 / 5e-4 above, in line with GPT-2-sized recipes."""
    small = sum(p.numel() for p in model.parameters()) < 10_000_000
    if lora:
        return 5e-3 if small else 5e-4
    return 1e-3 if small else 5e-5


def answer_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE, with logits computed at
    those positions only (what `kiln.train.engine.token_loss_sum` gives, without the masked positions' head)."""
    inputs, labels = batch
    answers = labels != IGNORE
    logits, _ = model(inputs, logits_at=answers)
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits lose too much in the sum
    return F.cross_entropy(logits, labels[answers], reduction="sum")


@torch.no_grad()
def masked_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over every answer token of `examples` (each token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, labels in in_batches(examples, batch_size, pad_id):
        batch = (inputs.to(device), labels.to(device))
        total += answer_loss_sum(model, batch).item()
        count += int((batch[1] != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def run_sft(
    model: nn.Module,
    train: list[Example],
    val: list[Example],
    config: FinetuneConfig,
    train_config: TrainConfig,
    pad_id: int,
    out: Path,
    save: Callable[[Path, nn.Module, TrainingState | None], None],
    restore: Callable[[Path, nn.Module], TrainingState],
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_estimate: Callable[[int, float], None] | None = None,
    lora: bool = False,
) -> TrainResult:
    """Train `model` (its trainable parameters) on `train` into `out` (`last/`, `best/`, metrics.jsonl);
    `save` and `restore` write and read one checkpoint folder (a full checkpoint or an adapter)."""
    if not val:
        raise KilnError("the val split is empty; use more data or a larger val fraction")
    if train_config.max_tokens:
        raise ConfigError("fine-tuning examples differ in length; limit it with --max-iters, --epochs or --max-time")
    lr = config.lr or default_lr(model, lora)
    steps = ExampleSteps(train, train_config.rows_per_step, pad_id, seed=train_config.seed)
    stage = Stage(
        rows=steps.rows,
        batch=steps.batch,
        evaluate=lambda module: {"val_loss": masked_loss(module, val, pad_id, train_config.batch_size * 2)},
        loss_sum=answer_loss_sum,
        save=save,
        restore=restore,
        steps_per_epoch=steps.steps_per_epoch,
        evaluate_at_start=True,
    )
    return train_model(model, config.optim(lr), train_config, stage, out, resume, on_step, on_estimate)
