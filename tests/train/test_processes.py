"""The engine through the `kiln` command: --device on every command that loads a model, training in
2 real processes (--nproc, torchrun underneath) resumed in 1, fine-tuning in 2, a rank killed
mid-run, and TensorBoard event files."""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.cli import main
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig

TINY = ["--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--set", "n_layer=1"]
TINY += ["--set", "block_size=32", "--set", "eval_batches=2", "--set", "eval_interval=10"]


def kiln(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def chat_checkpoint(tmp_path):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(string.ascii_letters + string.digits + " #:\n.,'!?-", specials=[EOS])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, info={"template": "alpaca"})


def command_lines(checkpoint: Path, tmp_path: Path, mirror: Path) -> dict[str, list[str]]:
    data = tmp_path / "tiny.json"
    data.write_text(
        json.dumps([{"instruction": f"say hi {c}", "input": "", "output": "hi"} for c in "abcdefghijklmnopqrst"])
    )
    return {
        "train": ["train", *TINY, "--max-iters", "2", "--out", str(tmp_path / "train")],
        "finetune": [
            "finetune",
            str(checkpoint),
            "--data",
            str(data),
            "--max-iters",
            "2",
            "--out",
            str(tmp_path / "ft"),
        ],
        "sample": ["sample", str(checkpoint), "--max-new-tokens", "5", "--seed", "1"],
        "chat": ["chat", str(checkpoint), "--max-new-tokens", "5"],
        "evaluate": ["evaluate", str(checkpoint), "--data", str(data), "--limit", "2", "--max-new-tokens", "4"],
    }


@pytest.mark.parametrize("command", ["train", "finetune", "sample", "chat", "evaluate"])
def test_device_cpu_works_on_every_command(command, chat_checkpoint, tmp_path, mirror, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert main([*command_lines(chat_checkpoint, tmp_path, mirror)[command], "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "finetune", "sample", "chat", "evaluate"])
def test_a_device_that_is_not_here_is_one_line_and_exit_2(command, chat_checkpoint, tmp_path, mirror, capsys):
    for device, says in (("cuda", "this machine has no CUDA GPU"), ("cuda:3", "no CUDA GPU"), ("tpu", "not a device")):
        assert main([*command_lines(chat_checkpoint, tmp_path, mirror)[command], "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("kiln: error: --device") and says in err, err


def test_train_in_two_processes_then_resume_in_one(tmp_path, mirror):
    run_dir = tmp_path / "run"
    done = kiln("train", *TINY, "--max-iters", "20", "--out", str(run_dir), "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert "2 processes (ddp)" in done.stdout and done.stdout.count("done: 20 steps") == 1  # rank 0 speaks
    assert load_checkpoint(run_dir / "last").state.progress["world_size"] == 2
    done = kiln("train", *TINY, "--max-iters", "30", "--out", str(run_dir), "--resume")
    assert done.returncode == 0, done.stderr
    assert steps_logged(run_dir) == [10, 20, 30]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert load_checkpoint(run_dir / "last").state.progress["world_size"] == 1


def test_finetune_in_two_processes(tmp_path, chat_checkpoint):
    data = tmp_path / "tiny.json"
    words = [a + b for a in "abcd" for b in "efghij"]  # 24 different examples
    data.write_text(json.dumps([{"instruction": f"say {w}", "input": "", "output": w} for w in words]))
    out = tmp_path / "ft"
    done = kiln(
        "finetune",
        str(chat_checkpoint),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-iters",
        "6",
        "--set",
        "eval_interval=3",
        "--nproc",
        "2",
        "--lora-r",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert steps_logged(out) == [0, 3, 6] and (out / "best" / "adapter_model.safetensors").is_file()


def test_a_rank_killed_mid_run_ends_the_run_with_one_line_naming_it(tmp_path, mirror):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_DIST_TIMEOUT": "30"}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln",
            "train",
            *TINY,
            "--max-iters",
            "100000",
            "--out",
            str(tmp_path / "r"),
            "--nproc",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        victim = _wait_for_rank(1, run.pid, deadline=time.time() + 120)
        time.sleep(2)  # let it train a little
        os.kill(victim, signal.SIGKILL)
        _, err = run.communicate(timeout=90)
    finally:
        run.kill()
    assert run.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("kiln: error: process")]
    assert len(lines) == 1 and lines[0].startswith("kiln: error: process 1 of 2 was killed (signal 9)"), err
    assert "Traceback" not in err


def _wait_for_rank(rank: int, launcher: int, deadline: float) -> int:
    """The pid of the training process with RANK=rank started under `launcher`."""
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == launcher:
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            is_worker = f"RANK={rank}".encode() in environ and b"kiln" in cmdline and b"--nproc" not in cmdline
            if is_worker and Path(f"/proc/{entry.name}/stat").read_text().split()[3] != "0":
                return int(entry.name)
        time.sleep(0.5)
    raise AssertionError(f"no rank {rank} process appeared")


def test_tensorboard_gets_the_same_scalars(tmp_path, mirror, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    assert main(["train", *TINY, "--max-iters", "20", "--out", str(run_dir), "--set", "log=tensorboard"]) == 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("val_loss")]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert val == [(r["step"], pytest.approx(r["val_loss"])) for r in logged]
    assert {"train_loss", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])
