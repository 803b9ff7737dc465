"""Fine-tuning survives any crash: `kiln finetune` SIGKILLed from outside at random moments (seeded), inside
checkpoint saves too, and resumed each time, ends bit for bit where an uninterrupted run does, for full
fine-tuning and LoRA, with dropout (so the RNG matters) and accumulation; no checkpoint is ever left corrupt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.checkpoint import save_checkpoint
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig
from kiln.train.metrics import read_metrics

KILLS_PER_MODE = 10
CLOCK = ("elapsed_s", "tokens_per_s", "mfu")  # the fields that differ from run to run
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture
def dropout_base(tmp_path) -> Path:
    """A 1-layer char model with dropout 0.1, which full fine-tuning keeps (LoRA adds its own)."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,?!:\n'", specials=[EOS])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    return save_checkpoint(tmp_path / "base", GPT(config), tokenizer)


def command(base: Path, data: Path, out: Path, mode: str, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "kiln", "finetune", str(base), "--data", str(data), "--out", str(out)]
    args += ["--max-iters", "45", "--set", "eval_interval=3", "--set", "grad_accum=2", "--set", "batch_size=4"]
    args += ["--set", "lr=3e-3", "--set", "threads=1"]
    args += ["--lora-r", "4", "--lora-dropout", "0.1"] if mode == "lora" else []
    return args + (["--resume"] if resume else [])


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in read_metrics(out)]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_at_random_and_resumed_ends_bit_for_bit_where_a_straight_run_does(
    tmp_path, dropout_base, instruction_file, kill_and_resume, mode
):
    straight = tmp_path / "straight"
    done = subprocess.run(
        command(dropout_base, instruction_file, straight, mode, False),
        env={**os.environ, "KILN_QUIET": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    kill_and_resume(lambda resume: command(dropout_base, instruction_file, out, mode, resume), out, KILLS_PER_MODE)
    assert records(out) == records(straight)
    for folder in ("last", "best"):
        a, b = (load_file(str(run / folder / WEIGHTS[mode])) for run in (out, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
