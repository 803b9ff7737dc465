"""Fine-tuning on the engine: interrupted and resumed it lands bit for bit where a straight run does
(full and LoRA, with dropout so that the RNG matters), and it takes the engine's accumulation."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from kiln.checkpoint import load_checkpoint, load_training_state
from kiln.cli import main
from kiln.finetune import run as finetune_run


def finetune(base, data, out, *extra) -> int:
    args = ["finetune", str(base), "--data", str(data), "--out", str(out), "--max-iters", "12"]
    args += ["--set", "eval_interval=4", "--set", "block_size=64", "--set", "lr=3e-3", *extra]
    return main(args)


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "val_loss", "step_loss", "lr")} for r in rows]


def interrupt_after(step_count: int, monkeypatch) -> None:
    """Make the progress bar raise Ctrl-C after `step_count` steps, as a user stopping the run would."""

    @contextlib.contextmanager
    def stopping_bar(*args, **kwargs):
        done = {"steps": 0}

        def advance(n, label=None, total=None):
            done["steps"] += n
            if done["steps"] == step_count:
                raise KeyboardInterrupt

        yield advance

    monkeypatch.setattr(finetune_run, "progress_bar", stopping_bar)


@pytest.mark.parametrize("lora", [False, True, "bf16"])
def test_fine_tuning_resumes_bit_for_bit(tmp_path, base_checkpoint, instruction_file, monkeypatch, lora):
    method = ["--lora-r", "4", "--lora-dropout", "0.1"] if lora else ["--set", "grad_accum=2", "--set", "batch_size=4"]
    if lora == "bf16":  # bf16 autocast, with the frozen base's weights cast once (kiln.train.engine)
        method += ["--set", "precision=bf16"]
    assert finetune(base_checkpoint, instruction_file, tmp_path / "straight", *method) == 0
    with monkeypatch.context() as patch:
        interrupt_after(6, patch)
        assert finetune(base_checkpoint, instruction_file, tmp_path / "resumed", *method) == 130
    assert load_training_state(tmp_path / "resumed" / "last").progress["step"] == 4
    assert finetune(base_checkpoint, instruction_file, tmp_path / "resumed", *method, "--resume") == 0
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
    for folder in ("last", "best"):
        straight = load_checkpoint(tmp_path / "straight" / folder).model.state_dict()
        resumed = load_checkpoint(tmp_path / "resumed" / folder).model.state_dict()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_second_run_into_the_same_folder_needs_resume(tmp_path, base_checkpoint, instruction_file, capsys):
    assert finetune(base_checkpoint, instruction_file, tmp_path / "run") == 0
    assert finetune(base_checkpoint, instruction_file, tmp_path / "run") == 2
    assert "already holds a fine-tuning run; pass --resume" in capsys.readouterr().err
    assert finetune(base_checkpoint, instruction_file, tmp_path / "new", "--resume") == 2
    assert "no fine-tuning checkpoint to resume" in capsys.readouterr().err
    assert finetune(base_checkpoint, instruction_file, tmp_path / "run", "--resume", "--lora-r", "2") == 2
    assert "resume with the same ones" in capsys.readouterr().err
