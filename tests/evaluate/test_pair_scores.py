"""Scoring preference pairs: an answer's log-probability counts its own tokens only (prompt and padding
add nothing), and `kiln evaluate` reports preference accuracy and mean margin of any checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.checkpoint import load_checkpoint
from kiln.cli import main
from kiln.data.preferences import encode_pair, load_preferences
from kiln.data.templates import get_template
from kiln.evaluate.preferences import answer_logprobs, preference_summary, reward_margins, sequence_logprobs
from kiln.evaluate.run import evaluate
from kiln.model.gpt import IGNORE

WORDS = ("sky", "tree", "frog", "lamp", "bird", "rain", "snow", "moon", "cake", "door", "road", "ship")


def test_only_labelled_tokens_count_and_prompt_or_padding_logits_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 0, IGNORE], [IGNORE, 3, 3, 1, 2]])
    by_hand = [
        sum(
            torch.log_softmax(logits[row, t], dim=-1)[label].item()
            for t, label in enumerate(labels[row].tolist())
            if label != IGNORE
        )
        for row in range(2)
    ]
    assert answer_logprobs(logits, labels).tolist() == pytest.approx(by_hand, rel=1e-6)
    noisy = logits.clone()
    noisy[0, :2] += 100 * torch.randn(2, 4)  # the prompt's positions
    noisy[0, 4] = float("nan")  # padding may hold anything at all
    noisy[1, 0] -= 50
    assert torch.equal(answer_logprobs(noisy, labels), answer_logprobs(logits, labels))


def test_an_answer_scores_the_same_alone_and_padded_beside_a_longer_one(tiny_checkpoint, tmp_path):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path / "tiny", "abcdefghijklmnopqrstuvwxyz ."))
    short = ([5, 6, 7, 8], [IGNORE, IGNORE, 9, 10])
    long = ([5, 6, 7, 8, 9, 10, 11, 12, 13], [IGNORE, IGNORE, IGNORE, 3, 4, 5, 6, 7, 8])
    alone = sequence_logprobs(checkpoint.model, [short])
    together = sequence_logprobs(checkpoint.model, [long, short])
    assert together[1].item() == pytest.approx(alone[0].item(), abs=1e-5)
    # The prompt changes what the answer's tokens are conditioned on, never how many count.
    other_prompt = sequence_logprobs(checkpoint.model, [([20, 21, 7, 8], short[1])])
    assert other_prompt.item() != alone.item() and math.isfinite(other_prompt.item())


def test_margins_and_accuracy_with_and_without_a_reference():
    chosen, rejected = torch.tensor([-2.0, -5.0, -3.0]), torch.tensor([-4.0, -1.0, -3.0])
    assert reward_margins(chosen, rejected).tolist() == [2.0, -4.0, 0.0]
    summary = preference_summary(reward_margins(chosen, rejected))
    assert summary["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert summary["margin"] == pytest.approx(-2 / 3)
    reference_chosen, reference_rejected = torch.tensor([-3.0, -6.0, -3.0]), torch.tensor([-4.0, -1.0, -4.0])
    margins = reward_margins(chosen, rejected, reference_chosen, reference_rejected, beta=0.5)
    assert margins.tolist() == [0.5, 0.5, -0.5]


def test_kiln_evaluate_reports_preference_accuracy_and_mean_margin_of_any_checkpoint(
    tiny_checkpoint, write_jsonl, tmp_path, capsys
):
    records = [{"prompt": f"Name a {w}.", "chosen": f"A {w}, thank you.", "rejected": f"{w}."} for w in WORDS * 2]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    folder = tiny_checkpoint(tmp_path / "tiny", "".join(WORDS) + "NA.,", info={"template": "chat"}, block_size=48)
    out = tmp_path / "scores.jsonl"
    assert main(["evaluate", str(folder), "--data", str(data), "--split", "all", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preference accuracy (chosen likelier)" in printed and "mean log-prob margin" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12  # the exact repeats are counted once
    # By hand, from the model's own log-probabilities of each answer.
    checkpoint = load_checkpoint(folder)
    template, pairs = get_template("chat"), load_preferences(data).unique_pairs()
    encoded = [encode_pair(p, template, checkpoint.tokenizer, 48) for p in pairs]
    chosen = sequence_logprobs(checkpoint.model, [e.chosen for e in encoded])
    rejected = sequence_logprobs(checkpoint.model, [e.rejected for e in encoded])
    assert [r["logprob_chosen"] for r in rows] == pytest.approx(chosen.tolist(), abs=1e-5)
    assert [r["logprob_rejected"] for r in rows] == pytest.approx(rejected.tolist(), abs=1e-5)
    result = evaluate(folder, data, split="all", out=tmp_path / "again.jsonl", show=False)
    assert result["kind"] == "preferences" and result["pairs"] == 12 and not result["reference"]
    assert result["preference_accuracy"] == result["chosen_likelier"] == float((chosen > rejected).double().mean())
    assert result["mean_margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)
    assert f"{result['preference_accuracy']:.1%}" in printed


def test_pairs_the_tokenizer_cannot_read_are_left_out_and_counted(tiny_checkpoint, write_jsonl, tmp_path):
    records = [{"prompt": f"Name a {w}.", "chosen": f"A {w}, thank you.", "rejected": f"{w}."} for w in WORDS]
    records[4]["rejected"] = "~"  # a character the char vocabulary lacks
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    folder = tiny_checkpoint(tmp_path / "tiny", "".join(WORDS) + "NA.,", info={"template": "chat"}, block_size=48)
    result = evaluate(folder, data, split="all", out=tmp_path / "scores.jsonl", show=False)
    assert result["pairs"] == 11 and result["unreadable"] == 1 and result["cut_off"] == 0
