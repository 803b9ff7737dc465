"""bf16 autocast with the frozen weights (a LoRA base, a tied head) cast once for the whole run: the
same loss and gradients as autocast casting them at every call, and the fp32 weights left in place."""

from __future__ import annotations

import pytest
import torch

from kiln.finetune.examples import Example, pad_batch
from kiln.finetune.sft import answer_loss_sum
from kiln.model.gpt import GPT, IGNORE, GPTConfig
from kiln.model.lora import LoraSettings, add_lora
from kiln.train.engine import cast_frozen_weights

VOCAB = 61


def lora_model(new_tokens: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return add_lora(model, LoraSettings(r=4, dropout=0.0), [VOCAB - 1] if new_tokens else None)


def instruction_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for prompt, answer in ((9, 4), (14, 7), (5, 2)):
        ids = torch.randint(0, VOCAB - 1, (prompt + answer + 1,), generator=generator).tolist()
        examples.append(Example(ids[:-1], [IGNORE] * (prompt - 1) + ids[prompt:]))
    return pad_batch(examples, pad_id=VOCAB - 1)


def autocast_step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = answer_loss_sum(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("new_tokens", [False, True])
def test_frozen_weights_cast_once_compute_what_autocast_does(new_tokens):
    model = lora_model(new_tokens)
    gpt = model.get_base_model()
    batch = instruction_batch()
    expected_loss, expected_grads = autocast_step(model, batch)
    up = gpt.blocks[0].mlp.up.weight
    seen = []
    gpt.blocks[0].mlp.up.register_forward_hook(lambda module, args, out: seen.append(module.weight.dtype))
    undo = cast_frozen_weights(model, torch.bfloat16)
    loss, grads = autocast_step(model, batch)
    assert seen == [torch.bfloat16]  # inside its forward, the copy
    assert gpt.blocks[0].mlp.up.weight is up  # outside it, the layer's own fp32 weight
    undo()
    assert loss == expected_loss
    assert expected_grads.keys() == grads.keys()
    assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())
    assert new_tokens or gpt.lm_head.weight is gpt.wte.weight  # the head is still tied
    assert autocast_step(model, batch)[0] == expected_loss  # undone: autocast casts again, to the same numbers


def test_weights_that_train_are_left_to_autocast():
    gpt = lora_model(new_tokens=False).get_base_model()
    for param in gpt.parameters():  # full fine-tuning: autocast caches these casts itself
        param.requires_grad_(True)
    seen = []
    gpt.blocks[0].mlp.up.register_forward_hook(lambda module, args, out: seen.append(module.weight.dtype))
    undo = cast_frozen_weights(gpt, torch.bfloat16)
    autocast_step(gpt, instruction_batch())
    undo()
    assert seen == [torch.float32]
