"""Fine-tuning runs the output head only at the answer positions: the same loss and the same gradients
as the head over every position, on the same batch, for plain and LoRA models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.finetune.examples import Example, pad_batch
from kiln.finetune.sft import answer_loss_sum, masked_loss
from kiln.model.gpt import GPT, IGNORE, GPTConfig
from kiln.model.lora import LoraSettings, add_lora
from kiln.train.engine import token_loss_sum

VOCAB = 61


def tiny_gpt(style: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, block_style=style))


def instruction_examples() -> list[Example]:
    """Three examples of different lengths, each a prompt (no loss) and an answer."""
    generator = torch.Generator().manual_seed(1)
    examples = []
    for prompt, answer in ((9, 4), (14, 7), (5, 2)):
        ids = torch.randint(0, VOCAB - 1, (prompt + answer + 1,), generator=generator).tolist()
        examples.append(Example(ids[:-1], [IGNORE] * (prompt - 1) + ids[prompt:]))
    return examples


def instruction_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The examples padded to the longest (padding takes no loss either)."""
    return pad_batch(instruction_examples(), pad_id=VOCAB - 1)


def loss_and_gradients(model, loss_fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_logits_at_gives_the_rows_of_the_full_logits():
    model = tiny_gpt("gpt2").eval()
    inputs, labels = instruction_batch()
    answers = labels != IGNORE
    full, _ = model(inputs)
    some, _ = model(inputs, logits_at=answers)
    assert some.shape == (int(answers.sum()), VOCAB)
    torch.testing.assert_close(some, full[answers], rtol=1e-5, atol=1e-6)
    _, mean_loss = model(inputs, labels, logits_at=answers)
    assert mean_loss.item() == pytest.approx(F.cross_entropy(full[answers], labels[answers]).item(), rel=1e-6)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_the_answer_only_loss_equals_the_full_heads(style, lora):
    model = tiny_gpt(style)
    if lora:  # new token rows too: the tied head is peft's trainable-token wrapper then
        model = add_lora(model, LoraSettings(r=4, dropout=0.0, targets="all"), new_token_ids=[VOCAB - 2, VOCAB - 1])
    batch = instruction_batch()
    full_loss, full_grads = loss_and_gradients(model, token_loss_sum, batch)
    answer_loss, answer_grads = loss_and_gradients(model, answer_loss_sum, batch)
    assert answer_loss == pytest.approx(full_loss, rel=1e-6)
    assert full_grads.keys() == answer_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(answer_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_answer_only_loss_under_bf16_autocast_stays_close_to_the_full_heads():
    model = tiny_gpt("gpt2")
    batch = instruction_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full_loss = token_loss_sum(model, batch).item()
        answer_loss = answer_loss_sum(model, batch).item()
    assert answer_loss == pytest.approx(full_loss, rel=1e-3)


def test_the_val_loss_is_the_mean_over_answer_tokens_of_the_full_logits():
    model = tiny_gpt("llama")
    inputs, labels = instruction_batch()
    with torch.no_grad():
        logits, _ = model(inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE).item()
    loss = masked_loss(model, instruction_examples(), pad_id=VOCAB - 1, batch_size=2)
    assert loss == pytest.approx(expected, rel=1e-5)
