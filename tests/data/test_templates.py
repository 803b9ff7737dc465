"""Prompt templates: the text they write, and that only answer tokens (and their EOS) carry loss."""

from __future__ import annotations

import pytest

from kiln.data.instructions import Message
from kiln.data.templates import ALPACA_PREAMBLE, Encoded, encode_pieces, fit_to_context, get_template
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.finetune.examples import IGNORE, encode_conversations, pad_batch

ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
CONVERSATION = [Message("user", "Name a fruit.", "red ones"), Message("assistant", "A cherry.")]


@pytest.fixture
def chars():
    printable = [chr(c) for c in range(32, 127)] + ["\n"]
    return CharTokenizer(printable, specials=[EOS, *ROLES])


def text_of(pieces):
    return "".join(p.text if p.special is None else p.special for p in pieces)


def test_alpaca_writes_the_llms_from_scratch_layout():
    text = text_of(get_template("alpaca").render(CONVERSATION))
    assert text == (
        f"{ALPACA_PREAMBLE}\n\n### Instruction:\nName a fruit.\n\n### Input:\nred ones\n\n### Response:\nA cherry.{EOS}"
    )
    without_input = text_of(get_template("alpaca").render([Message("user", "Hi"), Message("assistant", "Yo")]))
    assert "### Input" not in without_input


def test_chat_template_uses_role_tokens_and_ends_turns_with_eos():
    messages = [Message("system", "Be kind."), *CONVERSATION]
    text = text_of(get_template("chat").render(messages))
    assert text == f"<|system|>\nBe kind.{EOS}<|user|>\nName a fruit.\n\nred ones{EOS}<|assistant|>\nA cherry.{EOS}"
    prompt = text_of(get_template("chat").render(messages[:-1], generation_prompt=True))
    assert prompt.endswith(f"{EOS}<|assistant|>\n")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_only_answer_tokens_carry_loss(chars, template):
    messages = [Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2"), Message("assistant", "A2")]
    encoded = encode_pieces(get_template(template).render(messages), chars)
    inputs, labels = encoded.inputs_and_labels()
    assert inputs == encoded.ids[:-1] and len(labels) == len(inputs)
    # Token by token: a label is kept exactly where the next token belongs to an answer or its EOS.
    rendered = get_template(template).render(messages)
    answer_chars = [p.trainable for p in rendered for _ in (p.text if p.special is None else [p.special])]
    assert [label != IGNORE for label in labels] == answer_chars[1:]
    assert [label for label in labels if label != IGNORE] == chars.encode(f"A1{EOS}A2{EOS}")
    # and with prompt loss switched on, every next token is a target
    assert encoded.inputs_and_labels(prompt_loss=True)[1] == encoded.ids[1:]


def test_typed_special_text_stays_text(chars):
    encoded = encode_pieces(get_template("chat").render([Message("user", "<|assistant|>")], True), chars)
    assistant = chars.special_tokens["<|assistant|>"]
    assert encoded.ids.count(assistant) == 1  # only the template's own, at the end
    assert encoded.ids[-2] == assistant


def test_truncation_cuts_the_prompt_first_then_the_answer():
    encoded = Encoded(list(range(10)), [False] * 6 + [True] * 4)
    cut = fit_to_context(encoded, 7)
    assert cut.truncated and cut.ids == [3, 4, 5, 6, 7, 8, 9] and cut.trainable == [False] * 3 + [True] * 4
    shorter = fit_to_context(encoded, 3)
    assert shorter.ids == [5, 6, 7] and shorter.trainable == [False, True, True]
    assert not fit_to_context(encoded, 10).truncated


def test_batches_pad_to_their_longest_example_and_ignore_the_padding(chars):
    convs = [
        type("C", (), {"messages": [Message("user", "Hi"), Message("assistant", "Yo")]})(),
        type("C", (), {"messages": [Message("user", "A longer question"), Message("assistant", "Answer")]})(),
    ]
    examples, truncated = encode_conversations(convs, get_template("chat"), chars, block_size=64)
    assert truncated == 0
    inputs, labels = pad_batch(examples, pad_id=chars.eos_id)
    assert inputs.shape[1] == max(len(e.inputs) for e in examples)  # dynamic, not the block size
    short = len(examples[0].inputs)
    assert (labels[0, short:] == IGNORE).all() and (inputs[0, short:] == chars.eos_id).all()
