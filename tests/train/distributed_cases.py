"""Tiny training runs on the engine, the same code on one process (in pytest) and on two (under
torchrun, through distributed_worker.py), so that their results can be compared. Models run in fp64:
ranks sum the same gradients in another order, and fp64 leaves that nothing but rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model

from kiln.checkpoint import WEIGHTS_FILE, load_training_state, save_checkpoint
from kiln.data.loaders import StepWindows
from kiln.finetune.examples import Example, ExampleSteps
from kiln.model.gpt import GPT, IGNORE, GPTConfig
from kiln.train.engine import Stage, TrainConfig, target_count, token_loss_sum, train_model
from kiln.train.optim import OptimConfig

VOCAB, BLOCK = 32, 8
# A constant learning rate, so that a run stopped at step 3 and resumed to 6 is a 6-step run.
OPTIM = OptimConfig(lr=1e-2, min_lr=1e-2, warmup_iters=0, decay="constant", weight_decay=0.1)


def tiny_model(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=dropout)
    return GPT(config).double()


def examples() -> list[Example]:
    """Answers of different lengths, so that a per-rank mean would weigh tokens unequally."""
    rng = np.random.default_rng(1)
    made = []
    for _ in range(24):
        length = int(rng.integers(3, BLOCK + 1))
        ids = rng.integers(0, VOCAB, length + 1).tolist()
        prompt = int(rng.integers(1, length))
        made.append(Example(ids[:-1], [IGNORE] * prompt + ids[prompt + 1 :]))
    return made


def _weights_io():
    def save(folder: Path, module, state) -> None:
        save_checkpoint(folder, module, None, state)

    def restore(folder: Path, module):
        load_model(module, str(folder / WEIGHTS_FILE))
        return load_training_state(folder)

    return save, restore


def run(kind: str, out: Path, settings: dict, resume: bool = False, seen: list | None = None) -> dict:
    """Train the tiny model on windows ("windows") or padded examples ("examples"); returns its
    weights, the loss of each step (on rank 0) and the final val loss. `seen` collects every row read."""
    settings = dict(settings)
    dropout = settings.pop("dropout", 0.0)
    config = TrainConfig(**({"eval_interval": 3, "max_iters": 5, "batch_size": 2} | settings))
    if kind == "windows":
        data = StepWindows(np.random.default_rng(0).integers(0, VOCAB, 4000), BLOCK, config.rows_per_step, 5)
        held_out = [data.batch(np.arange(0, 64, 8))]
    else:
        data = ExampleSteps(examples(), config.rows_per_step, pad_id=0, seed=5)
        held_out = [data.batch(np.arange(8))]

    def batch(rows):
        if seen is not None:
            seen.append(rows.tolist())
        return data.batch(rows)

    def evaluate(module):
        device = next(module.parameters()).device
        total = sum(float(token_loss_sum(module, tuple(t.to(device) for t in b))) for b in held_out)
        return {"val_loss": total / sum(target_count(b) for b in held_out)}

    save, restore = _weights_io()
    stage = Stage(data.rows, batch, evaluate, save, restore, steps_per_epoch=100.0)
    losses = []
    model = tiny_model(dropout)
    result = train_model(model, OPTIM, config, stage, out, resume, on_step=lambda s, loss: losses.append(loss))
    weights = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    return {"weights": weights, "losses": losses, "val_loss": result.last_val_loss}


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    model = tiny_model()
    load_model(model, str(folder / WEIGHTS_FILE))
    return {name: p.detach().clone() for name, p in model.named_parameters()}
