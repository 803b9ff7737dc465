"""Optimizers and the learning-rate schedule.

AdamW decays only the weight matrices (never norms, biases or embeddings). Muon orthogonalises the
updates of the 2-D weights inside the blocks, with AdamW on everything else. The schedule is nanoGPT's:
linear warmup, then cosine (or linear) decay to `min_lr`, then `min_lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from kiln.device import cpu_has_fast_bf16
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
    """Split the model's trainable parameters (a tied head counted once) by how they should be optimised."""
    groups = ParameterGroups([], [], [])
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen, as a LoRA base is
            continue
        if param.ndim < 2 or id(param) in embeddings:
            groups.no_decay.append(param)
        elif name.startswith("blocks."):
            groups.hidden_matrices.append(param)
        else:
            groups.other_matrices.append(param)
    return groups


def build_optimizers(model: nn.Module, config: OptimConfig, fused: bool | None = None) -> list[torch.optim.Optimizer]:
    """One AdamW, or Muon + AdamW. Every group records its `base_lr` for the schedule to scale. `fused`
    None: torch's fused AdamW wherever the device has it (not for sharded weights)."""
    groups = parameter_groups(model)
    fused = _fused_ok(model) if fused is None else fused
    betas = (config.beta1, config.beta2)
    if config.optimizer == "adamw":
        adamw_groups = [
            {"params": groups.hidden_matrices + groups.other_matrices, "weight_decay": config.weight_decay},
            {"params": groups.no_decay, "weight_decay": 0.0},
        ]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        optimizers = [torch.optim.AdamW(adamw_groups, lr=config.lr, betas=betas, fused=fused)]
    else:
        muon = Muon(
            groups.hidden_matrices,
            lr=config.muon_lr,
            weight_decay=config.weight_decay,
            adjust_lr_fn="match_rms_adamw",
            fp32_orthogonalization=not _fast_bf16(model),
        )
        adamw_groups = [
            {"params": groups.other_matrices, "weight_decay": config.weight_decay},
            {"params": groups.no_decay, "weight_decay": 0.0},
        ]
        adamw = torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=config.lr, betas=betas, fused=fused)
        optimizers = [muon, adamw]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


class Muon(torch.optim.Muon):
    """torch.optim.Muon, optionally orthogonalising in fp32.

    torch runs the Newton-Schulz iteration in bf16, which is right on GPUs and on CPUs with AMX or
    AVX-512 BF16. Elsewhere (AVX2 CPUs, most laptops) bf16 matrix products are emulated and a Muon step
    costs about 15 training steps; in fp32 it costs about a third of one. The update rule and the state
    (`momentum_buffer`) are torch's, so checkpoints move freely between the two.
    """

    def __init__(self, params, fp32_orthogonalization: bool = False, **settings):
        super().__init__(params, **settings)
        self.fp32_orthogonalization = fp32_orthogonalization

    @torch.no_grad()
    def step(self, closure=None):
        if not self.fp32_orthogonalization:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * _muon_lr_scale(group["adjust_lr_fn"], param.shape))
        return loss


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Muon's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, in fp32."""
    a, b, c = coefficients
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


def _muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot's scaling: update RMS matches AdamW's (0.2)
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # Keller Jordan's original


def _fast_bf16(model: nn.Module) -> bool:
    device = next(model.parameters()).device
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return device.type == "cuda"


def _fused_ok(model: nn.Module) -> bool:
    return next(model.parameters()).device.type in ("cpu", "cuda")


class UpdateInBackward:
    """Each weight's update as soon as backward has completed its gradient, which is then freed, so a step
    never holds every gradient at once (0.65 GB for an untied GPT-2 small). For runs where nothing needs
    the gradients together: no clipping, no accumulation, one process. The optimizers' own `step` runs
    on one weight at a time (its group's other weights set aside for the call), so the arithmetic and
    the state are theirs, the same as one step over all weights."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.handles = [
            param.register_post_accumulate_grad_hook(partial(self._update, optimizer, group))
            for optimizer in optimizers
            for group in optimizer.param_groups
            for param in group["params"]
        ]

    @staticmethod
    def _update(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> None:
        everyone = [g["params"] for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["params"] = []
            group["params"] = [param]
            optimizer.step()
        finally:
            for g, params in zip(optimizer.param_groups, everyone, strict=True):
                g["params"] = params
        param.grad = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier on each group's base learning rate at `step` (0-based) of a `total_steps` run."""
    min_ratio = config.min_lr / config.lr
    # Warmup takes at most a fifth of the run: a short run (a few epochs of a small text) would otherwise
    # end before it ever reached its learning rate.
    warmup = min(config.warmup_iters, total_steps // 5)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.decay == "constant":
        return 1.0
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.decay == "cosine":
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)
    return 1.0 - progress * (1.0 - min_ratio)


def continued_lr_factor(
    step: int, total_steps: int, config: OptimConfig, restart: tuple[int, float] | None = None
) -> float:
    """`lr_factor`, except that a run resumed with a new length at step k (`restart` = (k, the factor
    it had reached)) decays from where it stood to `min_lr` over its new remaining steps, instead of
    jumping to where a run of the new length would be."""
    if restart is None or step < restart[0] or config.decay == "constant":
        return lr_factor(step, total_steps, config)
    begun, reached = restart
    min_ratio = config.min_lr / config.lr
    if step >= total_steps:
        return min_ratio
    progress = (step - begun) / max(1, total_steps - begun)
    if config.decay == "cosine":
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (reached - min_ratio)
    return reached - progress * (reached - min_ratio)


def set_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
