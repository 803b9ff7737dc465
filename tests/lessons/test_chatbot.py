"""Lesson 5: the quick run completes and fine-tuning lowers the val loss; LoRA's update has rank at most r,
and merging it by hand gives peft's merged weights and the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from kiln.lessons import chatbot
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.lora import LoraSettings, add_lora, merge_lora


@pytest.fixture(scope="module")
def quick_run(run_quick_lesson):
    """Lesson 5 once in quick mode; the tests read its figures."""
    return run_quick_lesson(5)


def test_quick_run_completes_and_returns_its_figures(quick_run):
    out, figures = quick_run
    assert figures["pretrain_steps"] == chatbot.PRETRAIN_STEPS[True]
    assert figures["finetune_steps"] == chatbot.FINETUNE_STEPS[True]
    assert figures["examples"] == {"train": 170, "val": 20, "test": 10}
    assert 0 < figures["adapter_weights"] < figures["trainable"] < figures["total"]
    assert figures["zero_start_change"] == 0.0  # B starts at zero: adding adapters changes nothing
    assert figures["delta_rank"] <= chatbot.LORA.r
    assert figures["merge_weight_gap"] < 1e-6 and figures["merge_logits_gap"] < 1e-4
    assert (out / "lora" / "best" / "adapter_model.safetensors").is_file()
    assert sum(line.startswith("assistant> ") for line in figures["chat"]) == 3


def test_fine_tuning_lowers_the_val_loss(quick_run):
    _, figures = quick_run
    assert figures["val_loss_after"] < figures["val_loss_before"]


def test_lora_update_has_rank_at_most_r_and_merges_like_peft():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=48, block_size=32, n_layer=2, n_head=2, n_embd=32, block_style="llama")
    r = 4
    model = add_lora(GPT(config), LoraSettings(r=r, alpha=8.0, dropout=0.0, targets="all")).eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    names = [name for name, module in model.get_base_model().named_modules() if isinstance(module, LoraLayer)]
    assert len(names) == 4 * config.n_layer
    x = torch.randn(3, config.n_embd)
    by_hand = {}
    for name in names:
        layer = chatbot.lora_layer(model, name)
        delta = chatbot.lora_delta(layer).detach()
        assert chatbot.numerical_rank(delta) == r  # random A and B: exactly r directions, never more
        by_hand[name] = chatbot.merged_weight(layer).detach()
        if layer.base_layer.in_features == config.n_embd:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), F.linear(x, by_hand[name], layer.base_layer.bias))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = model(ids)[0]
        merged = merge_lora(model)
        torch.testing.assert_close(merged(ids)[0], adapted, rtol=1e-5, atol=1e-5)
    for name in names:
        torch.testing.assert_close(merged.get_submodule(name).weight, by_hand[name], rtol=0, atol=1e-6)
