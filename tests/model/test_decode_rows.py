"""Batched decoding with each sequence at its own position: the rows a server decodes together."""

from __future__ import annotations

import torch

from kiln.model.gpt import GPT, GPTConfig
from kiln.model.kv_cache import SlotCache


def test_decode_rows_equals_the_full_forward_for_each_row():
    for style, kv_heads in (("gpt2", None), ("llama", 1)):
        torch.manual_seed(0)
        shape = {"n_layer": 2, "n_head": 2, "n_kv_head": kv_heads, "n_embd": 16, "block_style": style}
        model = GPT(GPTConfig(vocab_size=50, block_size=32, **shape)).eval()
        prompts = [torch.randint(0, 50, (1, n)) for n in (3, 7, 5)]
        slots, rows = SlotCache(model, 4), [0, 2, 3]
        for slot, prompt in zip(rows, prompts, strict=True):
            model.decode(prompt, slots.slot(slot))
        tokens = torch.randint(0, 50, (3, 1))
        positions = torch.tensor([p.shape[1] for p in prompts])
        logits = model.decode_rows(tokens, slots, torch.tensor(rows), positions)
        for row, prompt in enumerate(prompts):
            full, _ = model(torch.cat([prompt, tokens[row : row + 1]], dim=1))
            torch.testing.assert_close(logits[row, 0], full[0, -1], atol=1e-5, rtol=1e-5)
