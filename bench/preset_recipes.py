"""Changes to shakespeare-cpu's recipe, judged at a fixed step count so that the machine's speed drops out.

A change to the optimizer's settings or to the initialisation leaves the cost of a step as it is, so
two recipes can be compared after the same number of steps, which a host whose speed drifts by 20-40%
cannot spoil (a comparison at a fixed wall time can). 1,800 steps is about what 66 s gives on 2 cores.
Val loss is the loss over the whole val split in non-overlapping windows, as bench/pretrain_vs_nanogpt.py
and `kiln evaluate` measure it. Run from the
repository root (each variant takes about a minute):

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/preset_recipes.py [--steps 1800] [--only "beta1 0.8" ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from kiln.checkpoint import load_checkpoint
from kiln.evaluate.perplexity import token_metrics
from kiln.model.gpt import GPT
from kiln.train.run import build_settings, training_data
from kiln.train.trainer import train

ZERO_INIT = "zero-init"  # a variant key that is not a setting: start the output projections at zero
VARIANTS = {
    "none": {},
    "min_lr 0": {"min_lr": 0.0},
    "lr 8e-3": {"lr": 8e-3},
    "beta2 0.95": {"beta2": 0.95},
    "weight_decay 0": {"weight_decay": 0.0},
    "warmup 50": {"warmup_iters": 50},
    "beta1 0.8": {"beta1": 0.8},
    "zero-initialised output projections": {ZERO_INIT: True},
    "untied output head": {"tie_word_embeddings": False},
    "beta1 0.8 and beta2 0.95": {"beta1": 0.8, "beta2": 0.95},
    "beta1 0.7": {"beta1": 0.7},
    "beta1 0.8, beta2 0.95, lr 6.5e-3": {"beta1": 0.8, "beta2": 0.95, "lr": 6.5e-3},
    "none, seed 2": {"seed": 2},
    "none, seed 3": {"seed": 3},
    "beta1 0.8, seed 2": {"beta1": 0.8, "seed": 2},
    "beta1 0.8, seed 3": {"beta1": 0.8, "seed": 3},
    "linear decay": {"decay": "linear"},
    "linear decay to 0": {"decay": "linear", "min_lr": 0.0},
    "linear decay, seed 2": {"decay": "linear", "seed": 2},
    "linear decay to 0, seed 2": {"decay": "linear", "min_lr": 0.0, "seed": 2},
}


def zero_initialised(run) -> GPT:
    """The model train() would build from the run's seed, with attention and MLP output weights at zero."""
    torch.manual_seed(run.train.seed)
    model = GPT(run.model)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            torch.nn.init.zeros_(p)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run these variants (default: all)")
    args = parser.parse_args()
    data = training_data("tinyshakespeare", "char", os.environ.get("KILN_DATA_DIR"))
    table = Table(title=f"shakespeare-cpu after {args.steps:,} steps (seed 1337 unless named)")
    for column in ("change to the recipe", "val loss (whole split)", "wall s"):
        table.add_column(column)
    for name in args.only or VARIANTS:
        changes = dict(VARIANTS[name])
        zero = changes.pop(ZERO_INIT, False)
        settings = {"max_iters": args.steps, "eval_interval": 10**9, "eval_batches": 10, **changes}
        run = build_settings("shakespeare-cpu", data.tokenizer.vocab_size, settings, {})
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            train(run.model, run.optim, run.train, data, tmp, init_model=zero_initialised(run) if zero else None)
            seconds = time.perf_counter() - began
            val = token_metrics(load_checkpoint(f"{tmp}/last").model, data.tokenizer, data.tokens("val")).loss
        table.add_row(name, f"{val:.4f}", f"{seconds:.0f}")
        print(f"{name}: {val:.4f}", flush=True)
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
