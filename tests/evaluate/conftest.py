"""Tiny checkpoints to evaluate: an untrained one for any text, and one that has learned four answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.data.instructions import Conversation, Message
from kiln.data.templates import ALPACA_PREAMBLE, encode_pieces, get_template
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig

# Question, answer pairs that the trained fixture learns by heart, in the chat template.
LEARNED = [
    ("Colour of the sky?", "Blue."),
    ("What is 2 plus 2?", "4"),
    ("Capital of France?", "Paris."),
    ("Colour of grass?", "Green."),
]
ALPACA_TEXT = ALPACA_PREAMBLE + "\n### Instruction:Input:Response:"


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run several times faster on one thread than on several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_checkpoint(folder: Path, chars: str, info: dict | None = None, block_size: int = 64) -> Path:
    specials = [EOS, *get_template("chat").special_tokens[1:]]
    # The template's own text is always readable, so only the data's characters need naming.
    tokenizer = CharTokenizer(set(chars + ALPACA_TEXT), specials=specials)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    return save_checkpoint(folder, model, tokenizer, info=info)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_checkpoint():
    """`tiny_checkpoint(folder, chars, info=None, block_size=64)`: save an untrained GPT over a char
    vocabulary (chars, the Alpaca template's text, EOS and the chat role tokens); returns the folder."""
    return _tiny_checkpoint


@pytest.fixture()
def write_jsonl():
    """`write_jsonl(path, records)`: one JSON object per line; returns the path."""
    return _write_jsonl


@pytest.fixture()
def learned_answers() -> list[tuple[str, str]]:
    return list(LEARNED)


@pytest.fixture(scope="session")
def learned_checkpoint(tmp_path_factory) -> Path:
    """A chat-template model trained for a second until it answers the LEARNED questions exactly."""
    template = get_template("chat")
    conversations = [Conversation([Message("user", q), Message("assistant", a)]) for q, a in LEARNED]
    specials = [EOS, *template.special_tokens[1:]]
    tokenizer = CharTokenizer(set("".join(q + a + "\n" for q, a in LEARNED)), specials=specials)
    encoded = [encode_pieces(template.render(c.messages), tokenizer).inputs_and_labels() for c in conversations]
    longest = max(len(inputs) for inputs, _ in encoded)
    x = torch.zeros(len(encoded), longest, dtype=torch.long)
    y = torch.full((len(encoded), longest), -100)
    for row, (inputs, labels) in enumerate(encoded):
        x[row, : len(inputs)], y[row, : len(labels)] = torch.tensor(inputs), torch.tensor(labels)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(before)
    assert loss.item() < 0.05, "the fixture model did not learn its answers"
    folder = tmp_path_factory.mktemp("learned") / "best"
    return save_checkpoint(folder, model, tokenizer, info={"template": "chat"})
