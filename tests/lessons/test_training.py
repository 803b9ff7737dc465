"""Lesson 4's numerics: cross-entropy by hand against PyTorch, an untrained model's ln(V), The Verdict's
windows, a training loop that lowers the loss, reproducible sampling, and the lesson run whole (quick)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.lessons import training


@pytest.fixture(scope="module")
def quick_run(run_quick_lesson):
    """Lesson 4 once in quick mode; several tests read its figures and files."""
    return run_quick_lesson(4)


@pytest.fixture(scope="module")
def verdict_loaders(verdict_text, gpt2):
    return training.text_loaders(verdict_text, gpt2)


def test_cross_entropy_by_hand_equals_torch_for_one_sequence():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(7, 50, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (7,), generator=generator)
    by_hand = training.cross_entropy_by_hand(logits, targets)
    assert by_hand.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=0, abs=1e-12)
    # and it is what the words say: the mean of -log softmax at each target
    probabilities = logits.softmax(-1)
    expected = sum(-math.log(probabilities[i, t]) for i, t in enumerate(targets.tolist())) / 7
    assert by_hand.item() == pytest.approx(expected, rel=0, abs=1e-12)


def test_cross_entropy_by_hand_equals_torch_for_a_batch():
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(3, 5, 50, generator=generator)
    targets = torch.randint(0, 50, (3, 5), generator=generator)
    by_hand = training.cross_entropy_by_hand(logits, targets).item()
    assert by_hand == pytest.approx(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), abs=1e-5)
    # torch's own batched layout (batch, classes, positions) gives the same number without flattening
    assert by_hand == pytest.approx(F.cross_entropy(logits.transpose(1, 2), targets).item(), abs=1e-5)


def test_the_verdict_gives_the_books_batch_counts(verdict_loaders):
    train, val = verdict_loaders
    assert (len(train), len(val)) == (9, 1)
    assert sum(x.numel() for x, _ in train) == 4608 and sum(x.numel() for x, _ in val) == 512
    x, y = list(val)[0]  # a whole pass: a loader left mid-epoch would resume there
    assert x.shape == (2, 256) and torch.equal(x[:, 1:], y[:, :-1])  # targets: inputs shifted by one


def test_an_untrained_model_scores_about_ln_vocab(gpt2, verdict_loaders):
    loss = training.loss_over_loader(training.random_model(gpt2.vocab_size), verdict_loaders[1])
    assert abs(loss - math.log(gpt2.vocab_size)) < 0.5


def test_seeded_generation_is_reproducible(gpt2):
    model = training.random_model(gpt2.vocab_size)
    settings = training.sampling_settings(max_new_tokens=6)
    first = training.continuations(model, gpt2, training.PROMPT, settings)
    assert training.continuations(model, gpt2, training.PROMPT, settings) == first
    other_seed = training.continuations(model, gpt2, training.PROMPT, training.sampling_settings(6, seed=7))
    assert other_seed["temperature 1.5"] != first["temperature 1.5"]
    assert other_seed["greedy (temperature 0)"] == first["greedy (temperature 0)"]  # greedy draws nothing


def test_the_minimal_loop_lowers_the_loss(quick_run):
    _, figures = quick_run
    assert figures["final_train_loss"] < figures["initial_train_loss"] - 0.3
    assert figures["final_val_loss"] < figures["initial_val_loss"] - 0.3
    assert figures["step_losses"][-1] < figures["step_losses"][0]


def test_quick_run_prints_its_figures_and_writes_its_plot(quick_run):
    out, figures = quick_run
    assert (out / "loss-curve.png").is_file() and figures["plot"] == str(out / "loss-curve.png")
    assert figures["ce_one_by_hand"] == pytest.approx(figures["ce_one_torch"], abs=1e-5)
    assert figures["ce_batch_by_hand"] == pytest.approx(figures["ce_batch_torch"], abs=1e-5)
    assert (figures["train_batches"], figures["val_batches"]) == (9, 1)
    assert figures["ln_vocab"] == pytest.approx(10.8249, abs=1e-4)
    assert figures["kiln_steps"] == training.KILN_STEPS[True]
    assert (out / "kiln-train" / "best" / "model.safetensors").is_file()
    assert set(figures["generations"]) == set(training.sampling_settings(1))
