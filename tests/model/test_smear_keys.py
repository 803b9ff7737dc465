"""Smeared keys: each key mixes in the key before it, the same in training and in every decoding path."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.errors import KilnError
from kiln.generate.sampling import SamplingConfig, generate, generate_rows
from kiln.interop.gguf_export import _check_exportable
from kiln.interop.layouts import hf_config
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.kv_cache import KVCache, SlotCache


def smeared(style: str, kv_heads: int | None = None) -> GPT:
    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 2, "n_kv_head": kv_heads, "n_embd": 16, "block_style": style}
    model = GPT(GPTConfig(vocab_size=50, block_size=24, smear_keys=True, **shape)).eval()
    with torch.no_grad():
        for block in model.blocks:  # each head its own mix, not the initial half and half
            block.attn.smear.uniform_(-2, 2)
    return model


def test_a_key_is_its_own_mixed_with_the_one_before_it_as_written_out():
    model = smeared("gpt2")
    attn, x = model.blocks[0].attn, torch.randn(1, 5, 16)
    _, k, _ = attn._project(x, None)
    plain = attn.qkv(x)[..., 16:32].view(1, 5, 2, 8).transpose(1, 2)  # gpt2: no RoPE, keys as computed
    own = torch.sigmoid(attn.smear)[None, :, None, None]
    before = torch.cat([torch.zeros_like(plain[:, :, :1]), plain[:, :, :-1]], dim=2)
    torch.testing.assert_close(k, own * plain + (1 - own) * before)


def test_all_own_is_the_plain_model():
    model = smeared("llama")
    plain = GPT(GPTConfig(**{**model.config.to_dict(), "smear_keys": False})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("smear")})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.smear.fill_(100.0)  # sigmoid(100) = 1: no key before is mixed in
    idx = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])


@pytest.mark.parametrize("style, kv_heads", [("gpt2", None), ("llama", 1)])
def test_a_prefill_then_steps_equal_the_full_forward(style, kv_heads):
    model = smeared(style, kv_heads)
    idx = torch.randint(0, 50, (1, 12))
    full, _ = model(idx)
    cache = KVCache.for_model(model)
    steps = [model.decode(idx[:, :5], cache)] + [model.decode(idx[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_decode_rows_equals_the_full_forward_for_each_row():
    model = smeared("llama")
    prompts = [torch.randint(0, 50, (1, n)) for n in (3, 7, 5)]
    slots, rows = SlotCache(model, 4), [0, 2, 3]
    for slot, prompt in zip(rows, prompts, strict=True):
        model.decode(prompt, slots.slot(slot))
    tokens = torch.randint(0, 50, (3, 1))
    logits = model.decode_rows(tokens, slots, torch.tensor(rows), torch.tensor([p.shape[1] for p in prompts]))
    for row, prompt in enumerate(prompts):
        full, _ = model(torch.cat([prompt, tokens[row : row + 1]], dim=1))
        torch.testing.assert_close(logits[row, 0], full[0, -1], atol=1e-5, rtol=1e-5)


def test_rows_equal_their_runs_and_go_on_past_the_context_window():
    model = smeared("llama")
    prompt = torch.randint(0, 50, (1, 6))
    config = SamplingConfig(max_new_tokens=40, temperature=1.0)  # past the 24-token window: a rebuild
    alone = [list(generate(model, prompt, SamplingConfig(**{**config.__dict__, "seed": s}))) for s in (1, 2)]
    assert [list(row) for row in zip(*generate_rows(model, prompt, config, [1, 2]), strict=True)] == alone


def test_the_smear_is_learnt():
    model = smeared("llama").train()
    idx = torch.randint(0, 50, (2, 10))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(block.attn.smear.grad.abs().sum() > 0 for block in model.blocks)


def test_a_model_with_smeared_keys_is_not_exported():
    model = smeared("llama")
    with pytest.raises(KilnError, match="smeared keys"):
        hf_config(model.config, bos_id=None, eos_id=None)
    with pytest.raises(KilnError, match="smeared keys"):
        _check_exportable(copy.deepcopy(model), None, "run/best")
