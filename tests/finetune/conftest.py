"""A tiny base checkpoint, a tiny instruction set and a tiny preference set, made in a second."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig

# Forty examples, each of its own word, so that no example, input or answer of the val split is also a
# training one: what val measures is how the model does on examples it has not seen.
WORDS = [
    *("apple", "river", "stone", "cloud", "horse", "table", "music", "paper", "grass", "chair", "bread", "light"),
    *("water", "plant", "sugar", "glass", "money", "night", "smile", "train", "field", "honey", "lemon", "mouse"),
    *("ocean", "piano", "queen", "robot", "snake", "tiger", "uncle", "voice", "whale", "yacht", "zebra", "brick"),
    *("candle", "dragon", "forest", "jungle"),
]
TASKS = [
    ("Repeat the word.", lambda word: word),
    ("Spell the word backwards.", lambda word: word[::-1]),
    ("Write the word in capitals.", str.upper),
    ("Add an s to the word.", lambda word: word + "s"),
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
    """Forty distinct examples in the base's own characters, and one ("What is 2 plus 2?") with digits."""
    records = [
        {"instruction": task, "input": word, "output": answer(word)}
        for word, (task, answer) in zip(WORDS, itertools.cycle(TASKS))
    ]
    records.append({"instruction": "What is 2 plus 2?", "input": "", "output": "4"})
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records))
    return path


# Polite and rude answers in three styles each; the rude ones are shorter, so a model that only counts
# characters finds them likelier, and what DPO must learn is the style.
POLITE = (
    "Thank you for asking: the {w} is lovely.",
    "Happy to help. A {w} is a fine thing.",
    "Good question! I like {w}s.",
)
RUDE = ("Ugh. {W}.", "No. {W}!", "Whatever, {w}.")


@pytest.fixture
def preference_file(tmp_path):
    """Forty preference pairs, one per word, in the base's own characters: a polite chosen answer and
    a rude rejected one, in three styles that the val pairs share with the training pairs."""
    records = [
        {
            "instruction": f"Tell me about the {word}.",
            "chosen": POLITE[i % 3].format(w=word),
            "rejected": RUDE[i % 3].format(w=word, W=word.capitalize()),
        }
        for i, word in enumerate(WORDS)
    ]
    path = tmp_path / "preferences.json"
    path.write_text(json.dumps(records))
    return path
