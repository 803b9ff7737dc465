"""The fused, sliced head-and-loss gives what the plain head and F.cross_entropy give under autograd:
the summed loss and the gradients of the hidden states and of the head's weight, tied or not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kiln.model import head_loss
from kiln.model.gpt import GPT, IGNORE, GPTConfig
from kiln.model.head_loss import head_loss_sum


def plain(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("slice_elements", [10**9, 3 * 50])  # one slice; slices of 3 rows, the last short
def test_loss_and_gradients_equal_autograds_through_the_plain_head(monkeypatch, slice_elements):
    monkeypatch.setattr(head_loss, "SLICE_ELEMENTS", slice_elements)
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    targets[[2, 7]] = IGNORE
    ours = head_loss_sum(hidden, weight, targets)
    (ours * 0.37).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    theirs = plain(hidden, weight, targets)
    (theirs * 0.37).backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    assert grads[0][2].abs().max() == 0  # an ignored row learns nothing


def test_without_gradients_it_is_the_loss_alone():
    hidden, weight, targets = torch.randn(5, 4), torch.randn(30, 4), torch.randint(0, 30, (5,))
    with torch.no_grad():
        torch.testing.assert_close(head_loss_sum(hidden, weight, targets), plain(hidden, weight, targets))


@pytest.mark.parametrize("tied", [True, False])
def test_a_large_vocabulary_model_trains_the_same_with_the_fused_head(monkeypatch, tied):
    monkeypatch.setattr(head_loss, "SLICE_ELEMENTS", 9000 * 5)  # several slices of 5 rows
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=head_loss.MIN_VOCAB_CPU + 5,  # on a CPU the fused head starts here, on a GPU at MIN_VOCAB
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        tie_word_embeddings=tied,
    )
    model = GPT(config).double()
    twin = copy.deepcopy(model)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    targets = torch.randint(0, config.vocab_size, (2, 16))
    targets[0, :4] = IGNORE
    logits, ours = model(idx, targets, loss_sum=True)
    assert logits is None  # the logits were never kept whole
    ours.backward()
    twin_logits, _ = twin(idx)
    theirs = F.cross_entropy(twin_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_below_its_vocabulary_the_plain_head_keeps_the_logits():
    config = GPTConfig(vocab_size=head_loss.MIN_VOCAB_CPU - 1, block_size=8, n_layer=1, n_head=2, n_embd=16)
    idx = torch.randint(0, config.vocab_size, (2, 8))
    logits, loss = GPT(config)(idx, idx, loss_sum=True)
    assert logits.shape == (2, 8, config.vocab_size) and loss.ndim == 0
    assert head_loss.pays(head_loss.MIN_VOCAB_CPU, torch.device("cpu"))
    assert not head_loss.pays(head_loss.MIN_VOCAB - 1, torch.device("cuda"))  # GPUs: the plain head below 8,192


def test_under_bf16_autocast_it_is_within_the_plain_heads_rounding():
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(9000, 32, requires_grad=True)
    targets = torch.randint(0, 9000, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head_loss_sum(hidden, weight, targets)
    ours.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.t()
    theirs = F.cross_entropy(logits.float(), targets, reduction="sum")
    theirs.backward()
    assert grads[1].dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=0)
    for a, b in zip(grads, (hidden.grad, weight.grad), strict=True):
        assert (a - b).norm() / b.norm() < 2e-2
