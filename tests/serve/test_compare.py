"""`kiln chat --compare` in the terminal: each question answered by the base, then the tuned model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.checkpoint import load_checkpoint
from kiln.generate.sampling import SamplingConfig, stream_text


@pytest.mark.parametrize("tuned", ["tuned", "lora"])
def test_compare_answers_with_the_base_then_the_tuned_model(served_runs, tuned):
    chat = subprocess.run(
        [sys.executable, "-m", "kiln", "chat", str(served_runs[tuned]), "--compare", "--temperature", "0"]
        + ["--max-new-tokens", "20", "--device", "cpu"],
        input="Capital of France?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.splitlines()
    base = load_checkpoint(served_runs["base"])
    expected = "".join(
        stream_text(base.model, base.tokenizer, "Capital of France?", SamplingConfig(max_new_tokens=20, temperature=0))
    )
    assert f"base> {expected}" in lines  # the base really runs without the fine-tuning
    answers = [line for line in lines if line.startswith(f"{tuned}> ")]
    assert len(answers) == 1 and answers[0] != f"{tuned}> {expected}"
    if tuned == "tuned":
        assert answers == ["tuned> Paris."]


def test_compare_needs_a_fine_tuned_model(served_runs):
    chat = subprocess.run(
        [sys.executable, "-m", "kiln", "chat", str(served_runs["base"]), "--compare"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chat.returncode == 2 and "nothing to compare" in chat.stderr
