"""Preference tuning with DPO (Rafailov et al., 2023) as a stage of the training engine.

A row is a preference pair. A micro-batch holds its pairs' chosen answers, then their rejected ones,
padded together (as fine-tuning pads examples), with the reference model's log-probabilities of each.
A pair's loss is -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log
ref(rejected))]), log-probabilities summed over answer tokens only; a step's loss is the mean over its
pairs. The reference is the starting model, frozen: its log-probabilities are computed once, before the
first step (with LoRA, with the adapter switched off), so no second copy of the model is held and a step
runs one forward pass, not two.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.checkpoint import TrainingState
from kiln.config import apply_settings
from kiln.data.preferences import PreferencePair, encode_pair
from kiln.data.templates import Template
from kiln.data.tokenizers import Tokenizer
from kiln.device import autocast_dtype, set_threads
from kiln.distributed import launched_world
from kiln.errors import ConfigError, DataError
from kiln.evaluate.preferences import answer_logprobs, preference_summary, reward_margins, sequence_logprobs
from kiln.finetune.examples import Example, ExampleSteps, pad_batch
from kiln.finetune.sft import FinetuneConfig
from kiln.model.lora import adapter_disabled
from kiln.train.engine import (
    Stage,
    TrainConfig,
    TrainResult,
    model_config_of,
    process_threads,
    train_device,
    train_model,
)


@dataclass
class DPOConfig:
    """What DPO adds to fine-tuning's settings."""

    beta: float = 0.1  # how far from the reference the policy may move: larger keeps it closer

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta {self.beta} must be above 0 (0.1 is usual)")


DEFAULT_EPOCHS = 1  # when no limit is given


def dpo_settings(settings: dict) -> tuple[FinetuneConfig, DPOConfig, TrainConfig]:
    """DPO's configs with `settings` applied: fine-tuning's, plus beta, and one epoch unless a limit is given."""
    config, dpo, train = apply_settings(
        [FinetuneConfig(), DPOConfig(), TrainConfig(batch_size=8, eval_interval=50)], settings
    )
    if config.prompt_loss:
        raise ConfigError("--prompt-loss: DPO compares answers only (a pair's prompt is the same on both sides)")
    if train.max_tokens:
        raise ConfigError(
            "max_tokens: preference pairs differ in length; limit DPO with --max-iters, --epochs or --max-time"
        )
    if not train.has_limit():
        train.epochs = DEFAULT_EPOCHS
    return config, dpo, train


def default_lr(model: nn.Module, lora: bool) -> float:
    """Below 10M weights 5e-4 full / 2e-3 LoRA, as measured on the demo's model (docs/finetune.md: 1e-4
    had not moved it far in 200 steps); above, LLMs-from-scratch ch. 7's 5e-6 for full DPO of GPT-2 (a
    tenth of its fine-tuning step) and, the same tenth, 5e-5 for LoRA."""
    small = sum(p.numel() for p in model.parameters()) < 10_000_000
    if lora:
        return 2e-3 if small else 5e-5
    return 5e-4 if small else 5e-6


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss, and the implicit rewards beta * (log pi - log ref) of the chosen and the
    rejected answer (detached: they are for reporting)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass
class Pairs:
    """Encoded preference pairs side by side, and the reference's log-probabilities [N, 2] (chosen,
    rejected) once computed."""

    chosen: list[Example]
    rejected: list[Example]
    reference: torch.Tensor | None = None

    @classmethod
    def encode(
        cls, pairs: list[PreferencePair], template: Template, tokenizer: Tokenizer, block_size: int
    ) -> tuple[Pairs, int, int]:
        """The pairs as examples of at most `block_size` inputs, how many were truncated, and how many
        were left out because an answer had no token left after truncation."""
        chosen, rejected, truncated, left_out = [], [], 0, 0
        for pair in pairs:
            encoded = encode_pair(pair, template, tokenizer, block_size)
            if encoded is None:
                left_out += 1
                continue
            chosen.append(Example(*encoded.chosen))
            rejected.append(Example(*encoded.rejected))
            truncated += encoded.truncated
        return cls(chosen, rejected), truncated, left_out

    def __len__(self) -> int:
        return len(self.chosen)

    def head(self, n: int) -> Pairs:
        reference = None if self.reference is None else self.reference[:n]
        return Pairs(self.chosen[:n], self.rejected[:n], reference)

    def logprobs(self, model: nn.Module, batch_size: int) -> torch.Tensor:
        """The model's log-probability of each pair's answers, [N, 2] (chosen, rejected)."""
        sides = [[(e.inputs, e.labels) for e in side] for side in (self.chosen, self.rejected)]
        return torch.stack([sequence_logprobs(model, side, batch_size) for side in sides], dim=1)


def reference_logprobs(model: nn.Module, pairs: Pairs, batch_size: int) -> torch.Tensor:
    """log ref of each pair's answers, [N, 2]: the model as it is, with a LoRA adapter switched off (the
    same weights in memory, not a copy)."""
    with adapter_disabled(model):
        return pairs.logprobs(model, batch_size)


def pair_metrics(model: nn.Module, pairs: Pairs, beta: float, batch_size: int) -> dict[str, float]:
    """Over `pairs`: DPO's loss, the mean reward margin, the preference accuracy (share of pairs with a
    positive reward margin), and, with no reference, the share whose chosen answer the model finds
    likelier than the rejected one (`chosen_likelier`)."""
    policy = pairs.logprobs(model, batch_size)
    assert pairs.reference is not None, "reference log-probabilities are computed before training"
    margins = reward_margins(policy[:, 0], policy[:, 1], pairs.reference[:, 0], pairs.reference[:, 1], beta)
    summary = preference_summary(margins)
    return {
        "loss": summary["loss"],
        "reward_margin": summary["margin"],
        "preference_accuracy": summary["accuracy"],
        "chosen_likelier": preference_summary(reward_margins(policy[:, 0], policy[:, 1]))["accuracy"],
    }


class PairSteps(ExampleSteps):
    """DPO's rows for the engine: pairs, shuffled per epoch as fine-tuning shuffles examples. A batch is
    (inputs, labels, reference): chosen answers in the first half of the rows, rejected in the second."""

    def __init__(self, pairs: Pairs, rows_per_step: int, pad_id: int, seed: int = 0):
        super().__init__(pairs.chosen, rows_per_step, pad_id, seed)
        self.pairs = pairs

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        answers = [self.pairs.chosen[i] for i in rows] + [self.pairs.rejected[i] for i in rows]
        inputs, labels = pad_batch(answers, self.pad_id)
        assert self.pairs.reference is not None, "reference log-probabilities are computed before training"
        reference = self.pairs.reference[torch.as_tensor(rows)]
        return inputs, labels, torch.cat([reference[:, 0], reference[:, 1]])


def dpo_loss_sum(beta: float) -> Callable[[nn.Module, tuple], torch.Tensor]:
    """The engine's loss for a DPO batch: the summed DPO loss of its pairs."""

    def loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels, reference = batch
        logits, _ = model(inputs)
        policy = answer_logprobs(logits, labels)
        n = len(reference) // 2
        losses, _, _ = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta)
        return losses.sum()

    return loss_sum


def pair_count(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    return len(batch[2]) // 2


def run_dpo(
    model: nn.Module,
    train: Pairs,
    val: Pairs,
    config: FinetuneConfig,
    dpo: DPOConfig,
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
    """Train `model` (its trainable parameters, as it stands: the reference) with DPO on `train` into
    `out`; every evaluation scores `val` and as many train pairs (`val_*`, `train_*`)."""
    if not len(val):
        raise DataError("the val split has no pairs; use more data")
    if not len(train):
        raise DataError("no training pairs are left after filtering; check the data and block_size")
    lr = config.lr or default_lr(model, lora)
    world = launched_world()
    device = train_device(train_config, world)
    set_threads(process_threads(train_config, world))
    shape = model_config_of(model)
    amp = autocast_dtype(train_config.precision, device, shape.n_embd if shape else None)
    batch_size = train_config.batch_size * 2  # evaluation holds no gradients
    model.to(device)
    # The reference is scored as the engine will score the policy: on its device, in its precision.
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    with autocast:
        for pairs in (train, val):
            pairs.reference = reference_logprobs(model, pairs, batch_size)
    probe = train.head(len(val))
    steps = PairSteps(train, train_config.rows_per_step, pad_id, seed=train_config.seed)

    def evaluate(module: nn.Module) -> dict[str, float]:
        scores = {f"val_{k}": v for k, v in pair_metrics(module, val, dpo.beta, batch_size).items()}
        return scores | {f"train_{k}": v for k, v in pair_metrics(module, probe, dpo.beta, batch_size).items()}

    stage = Stage(
        rows=steps.rows,
        batch=steps.batch,
        evaluate=evaluate,
        save=save,
        restore=restore,
        steps_per_epoch=steps.steps_per_epoch,
        loss_sum=dpo_loss_sum(dpo.beta),
        units=pair_count,
        evaluate_at_start=True,
    )
    return train_model(model, config.optim(lr), train_config, stage, out, resume, on_step, on_estimate, world)
