"""Optimizers and the learning-rate schedule.

AdamW decays only the weight matrices (never norms, biases or embeddings). Muon orthogonalises the
updates of the 2-D weights inside the blocks, with AdamW on everything else. The schedule is nanoGPT's:
linear warmup, then cosine (or linear) decay to `min_lr`, then `min_lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kiln.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")
DECAYS = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    decay: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    muon_lr: float = 0.02
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer '{self.optimizer}': choose {' or '.join(OPTIMIZERS)}")
        if self.decay not in DECAYS:
            raise ConfigError(f"decay '{self.decay}': choose one of {', '.join(DECAYS)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr {self.min_lr} must be between 0 and lr {self.lr}")


@dataclass
class ParameterGroups:
    hidden_matrices: list[nn.Parameter]  # 2-D weights inside the blocks
    other_matrices: list[nn.Parameter]  # 2-D weights outside them (an untied output head)
    no_decay: list[nn.Parameter]  # embeddings, norms, biases


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Split the model's parameters (a tied head counted once) by how they should be optimised."""
    groups = ParameterGroups([], [], [])
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        if param.ndim < 2 or id(param) in embeddings:
            groups.no_decay.append(param)
        elif name.startswith("blocks."):
            groups.hidden_matrices.append(param)
        else:
            groups.other_matrices.append(param)
    return groups


def build_optimizers(model: nn.Module, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """One AdamW, or Muon + AdamW. Every group records its `base_lr` for the schedule to scale."""
    groups = parameter_groups(model)
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw":
        adamw_groups = [
            {"params": groups.hidden_matrices + groups.other_matrices, "weight_decay": config.weight_decay},
            {"params": groups.no_decay, "weight_decay": 0.0},
        ]
        optimizers = [torch.optim.AdamW(adamw_groups, lr=config.lr, betas=betas, fused=_fused_ok(model))]
    else:
        muon = torch.optim.Muon(
            groups.hidden_matrices, lr=config.muon_lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        adamw_groups = [
            {"params": groups.other_matrices, "weight_decay": config.weight_decay},
            {"params": groups.no_decay, "weight_decay": 0.0},
        ]
        adamw = torch.optim.AdamW(
            [g for g in adamw_groups if g["params"]], lr=config.lr, betas=betas, fused=_fused_ok(model)
        )
        optimizers = [muon, adamw]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def _fused_ok(model: nn.Module) -> bool:
    return next(model.parameters()).device.type in ("cpu", "cuda")


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier on each group's base learning rate at `step` (0-based) of a `total_steps` run."""
    min_ratio = config.min_lr / config.lr
    if step < config.warmup_iters:
        return (step + 1) / (config.warmup_iters + 1)
    if config.decay == "constant":
        return 1.0
    if step >= total_steps:
        return min_ratio
    progress = (step - config.warmup_iters) / max(1, total_steps - config.warmup_iters)
    if config.decay == "cosine":
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)
    return 1.0 - progress * (1.0 - min_ratio)


def set_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
