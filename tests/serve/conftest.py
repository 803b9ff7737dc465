"""Tiny models to serve, made in seconds: a chat model that learned four answers (its base is a second
checkpoint, so compare has both sides), a real LoRA adapter on that base, and a live `kiln serve`."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from kiln.checkpoint import save_adapter, save_checkpoint
from kiln.data.instructions import Conversation, Message
from kiln.data.templates import encode_pieces, get_template
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.lora import LoraSettings, add_lora

LEARNED = [
    ("Colour of the sky?", "Blue."),
    ("What is 2 plus 2?", "4"),
    ("Capital of France?", "Paris."),
    ("Colour of grass?", "Green."),
]
CHARS = "".join(q + a for q, a in LEARNED) + " \nabcdefghijklmnopqrstuvwxyz<>|/"


def _batch(tokenizer):
    template = get_template("chat")
    conversations = [Conversation([Message("user", q), Message("assistant", a)]) for q, a in LEARNED]
    encoded = [encode_pieces(template.render(c.messages), tokenizer).inputs_and_labels() for c in conversations]
    longest = max(len(inputs) for inputs, _ in encoded)
    x = torch.zeros(len(encoded), longest, dtype=torch.long)
    y = torch.full((len(encoded), longest), -100)
    for row, (inputs, labels) in enumerate(encoded):
        x[row, : len(inputs)], y[row, : len(labels)] = torch.tensor(inputs), torch.tensor(labels)
    return x, y


def _fit(model, x, y, steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@pytest.fixture(scope="session")
def served_runs(tmp_path_factory) -> dict[str, Path]:
    """runs/base/best (untrained), runs/tuned/best (fully tuned from it: chat template, learned the
    answers), runs/lora/best (a LoRA adapter on runs/base/best, part way to them)."""
    runs = tmp_path_factory.mktemp("runs")
    tokenizer = CharTokenizer(set(CHARS), specials=[EOS, *get_template("chat").special_tokens[1:]])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
        model = GPT(config)
        base = save_checkpoint(runs / "base" / "best", model, tokenizer)
        x, y = _batch(tokenizer)
        lora = add_lora(copy.deepcopy(model), LoraSettings(r=8, alpha=32, dropout=0.0, targets="all"))
        assert _fit(model, x, y, 150, 1e-2) < 0.05, "the tuned fixture did not learn its answers"
        tuned = save_checkpoint(
            runs / "tuned" / "best", model, tokenizer, info={"template": "chat", "finetune": {"base": str(base)}}
        )
        _fit(lora, x, y, 100, 1e-2)  # enough to answer differently from its base
        adapter = save_adapter(runs / "lora" / "best", lora, base, tokenizer, info={"template": "chat"})
    finally:
        torch.set_num_threads(before)
    return {"base": base, "tuned": tuned, "lora": adapter, "runs": runs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`kiln serve ARGS` in its own process on a free localhost port, on the CPU; what it prints (stdout
    and stderr) goes to the file `log`, read back with output()."""

    def __init__(self, *args: str, log: Path, env: dict | None = None, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_QUIET": "1", **(env or {})}
        with open(log, "w") as out:  # a file, not a pipe: a server that prints much never blocks on it
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln", "serve", *args, "--port", str(self.port), "--device", "cpu"],
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kiln serve exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"kiln serve did not answer /health within {timeout:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """Everything the server printed so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def live_server(tmp_path) -> Iterator:
    """`live_server(*args, env=...)` starts `kiln serve ARGS` (its output in serve0.log, serve1.log, ... in
    the test's tmp_path) and returns it; every one still running is stopped after the test."""
    started: list[LiveServer] = []

    def start(*args: str | Path, env: dict | None = None) -> LiveServer:
        server = LiveServer(*map(str, args), log=tmp_path / f"serve{len(started)}.log", env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def long_checkpoint(served_runs) -> Path:
    """An untrained model with 1,024 positions and no EOS: a reply fills the context, which takes
    seconds, time to hang up."""
    tokenizer = CharTokenizer(set(CHARS))
    torch.manual_seed(1)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=1024, n_layer=8, n_head=4, n_embd=256)
    return save_checkpoint(served_runs["runs"] / "long" / "best", GPT(config), tokenizer)
