"""A tiny base checkpoint and a tiny instruction set, made in a second."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig

QUESTIONS = [
    ("What is the colour of the sky?", "", "The sky is blue."),
    ("Name a fruit.", "", "An apple."),
    ("Repeat the word.", "tree", "tree"),
    ("What is 2 plus 2?", "", "4"),
    ("Say hello.", "", "Hello!"),
    ("Give the opposite.", "hot", "cold"),
    ("Capital of France?", "", "Paris."),
    ("Spell cat backwards.", "", "tac"),
]


@pytest.fixture
def base_checkpoint(tmp_path):
    """A 2-layer llama-style char model (no weights trained) whose vocabulary lacks digits and '#'."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,?!:\n'", specials=[EOS])
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, block_style="llama"
    )
    return save_checkpoint(tmp_path / "base", GPT(config), tokenizer)


@pytest.fixture
def instruction_file(tmp_path):
    # Five wordings of each question (from the base's own characters), so that no two examples are the
    # same and the val split holds examples the model did not train on.
    openings = ["", "Please, ", "Now, ", "Quick: ", "Again, "]
    records = [{"instruction": o + q, "input": i, "output": a} for o in openings for q, i, a in QUESTIONS]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records))
    return path
