"""Greedy answers are scored against their references; a model that learned the answers scores 1."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.checkpoint import load_checkpoint
from kiln.data.instructions import Conversation, Message
from kiln.data.templates import encode_pieces, get_template
from kiln.errors import TokenizerError
from kiln.evaluate.responses import answer_loss, score_responses, summarize
from kiln.evaluate.scores import exact_match, rouge_l


def chat(question: str, answer: str) -> Conversation:
    return Conversation([Message("user", question), Message("assistant", answer)], source=f"test:{question}")


def test_a_model_that_learned_the_answers_scores_full_marks(learned_checkpoint, learned_answers):
    checkpoint = load_checkpoint(learned_checkpoint)
    conversations = [chat(q, a) for q, a in learned_answers]
    seen = []
    # A prompt of up to 22 tokens and 20 new ones overflow the context of 32: the prompt is still kept whole.
    records = score_responses(checkpoint, conversations, max_new_tokens=20, on_progress=seen.append)
    assert [r["response"] for r in records] == [a for _, a in learned_answers]
    assert all(r["rouge_l"] == 1.0 and r["exact_match"] is True for r in records)
    assert seen == records
    assert summarize(records).to_dict() == {"examples": 4, "rouge_l": 1.0, "exact_match": 1.0}
    assert answer_loss(checkpoint.model, checkpoint.tokenizer, get_template("chat"), conversations) < 0.05


def test_a_wrong_reference_is_scored_against_what_the_model_says(learned_checkpoint):
    checkpoint = load_checkpoint(learned_checkpoint)
    (record,) = score_responses(checkpoint, [chat("Capital of France?", "It is Paris")], max_new_tokens=20)
    assert record == {
        "instruction": "Capital of France?",
        "input": "",
        "reference": "It is Paris",
        "response": "Paris.",
        "rouge_l": pytest.approx(0.5),  # LCS "paris": P = 1/1, R = 1/3
        "exact_match": False,
        "source": "test:Capital of France?",
    }
    # The learned answer is likely, the wrong one is not.
    template, model, tokenizer = get_template("chat"), checkpoint.model, checkpoint.tokenizer
    right = answer_loss(model, tokenizer, template, [chat("Capital of France?", "Paris.")])
    wrong = answer_loss(model, tokenizer, template, [chat("Capital of France?", "Green.")])
    assert right < 0.1 < wrong


def test_alpaca_records_keep_instruction_and_input_and_greedy_answers_repeat(tmp_path, tiny_checkpoint):
    conversations = [
        Conversation([Message("user", "Rewrite in capitals.", "cat"), Message("assistant", "CAT")]),
        Conversation([Message("user", "Say hello.", ""), Message("assistant", "hello")]),
    ]
    chars = "Rewrite in capitals.catCATSay hello."
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "m", chars, {"template": "alpaca"}, block_size=256))
    first = score_responses(checkpoint, conversations, max_new_tokens=12, limit=1)
    again = score_responses(checkpoint, conversations, max_new_tokens=12)
    assert len(first) == 1 and len(again) == 2
    assert first[0] == again[0]
    assert (first[0]["instruction"], first[0]["input"], first[0]["reference"]) == ("Rewrite in capitals.", "cat", "CAT")
    for record in again:
        assert 0 < len(record["response"]) <= 12
        assert record["rouge_l"] == rouge_l(record["reference"], record["response"])
        assert record["exact_match"] == exact_match(record["reference"], record["response"])


def test_answer_loss_is_the_mean_over_answer_tokens(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "m", "abcxyz.", {"template": "alpaca"}, 256))
    template, model, tokenizer = get_template("alpaca"), checkpoint.model, checkpoint.tokenizer
    conversations = [chat("abc", "xyz."), chat("cab", "zy")]
    total, count = 0.0, 0
    for conversation in conversations:
        inputs, labels = encode_pieces(template.render(conversation.messages), tokenizer).inputs_and_labels()
        _, loss = model(torch.tensor([inputs]), torch.tensor([labels]))
        scored = sum(label != -100 for label in labels)
        assert scored == len(conversation.response) + 1  # the answer and its EOS
        total, count = total + loss.item() * scored, count + scored
    loss = answer_loss(model, tokenizer, template, conversations)
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert loss == pytest.approx(math.log(tokenizer.vocab_size), abs=0.1)  # untrained: about uniform


def test_a_character_the_model_cannot_read_names_the_record(tmp_path, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "m", "abc", {"template": "alpaca"}, 256))
    with pytest.raises(TokenizerError, match="test:Qué"):
        score_responses(checkpoint, [chat("Qué", "abc")])
