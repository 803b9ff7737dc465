"""A model packed for decoding computes what the plain model computes: fp32 within float rounding, bf16
within bf16's rounding; the plain model is left for training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kiln.generate.sampling import SamplingConfig, generate
from kiln.model import packed
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.kv_cache import KVCache
from kiln.model.packed import PackedLinear, pack_for_decoding

pytestmark = pytest.mark.skipif(not packed.packing_available("cpu"), reason="this torch has no oneDNN")


def tiny(style: str, tied: bool = True) -> GPT:
    torch.manual_seed(0)
    kv_heads = 1 if style == "llama" else None
    shape = dict(n_layer=2, n_head=2, n_kv_head=kv_heads, n_embd=32, block_style=style, tie_word_embeddings=tied)
    return GPT(GPTConfig(vocab_size=61, block_size=32, **shape)).eval()


def cached_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position, from a prefill of the first half and one token at a time after it."""
    cache = KVCache.for_model(model, batch_size=ids.shape[0])
    half = ids.shape[1] // 2
    pieces = [model.decode(ids[:, :half], cache)]
    pieces += [model.decode(ids[:, t : t + 1], cache) for t in range(half, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("style,tied", [("gpt2", True), ("llama", True), ("gpt2", False)])
def test_packed_fp32_decoding_equals_the_plain_full_forward(style, tied):
    model = tiny(style, tied)
    ids = torch.randint(0, 61, (2, 12))
    reference, _ = model(ids)
    fast = pack_for_decoding(copy.deepcopy(model), torch.float32)
    assert not any(type(m) is nn.Linear for m in fast.modules())
    torch.testing.assert_close(cached_logits(fast, ids), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_packed_bf16_decoding_is_within_bf16_rounding(style):
    model = tiny(style)
    ids = torch.randint(0, 61, (1, 12))
    reference, _ = model(ids)
    fast = pack_for_decoding(copy.deepcopy(model), torch.bfloat16)
    assert {m.weight.dtype for m in fast.modules() if isinstance(m, PackedLinear)} == {torch.bfloat16}
    logits = cached_logits(fast, ids)
    assert logits.dtype == torch.float32  # the activations between the products stay fp32
    # bf16 keeps 8 bits of mantissa: each weight is off by up to 2^-9 of itself
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()


def test_greedy_text_of_a_packed_fp32_model_is_the_plain_models():
    model = tiny("gpt2")
    prompt = torch.randint(0, 61, (1, 5))
    config = SamplingConfig(max_new_tokens=40, temperature=0)  # past the 32-token window, too
    expected = list(generate(model, prompt, config))
    assert list(generate(pack_for_decoding(copy.deepcopy(model)), prompt, config)) == expected


def test_without_onednn_bf16_casts_the_model_and_fp32_leaves_it(monkeypatch):
    monkeypatch.setattr(packed, "packing_available", lambda device: False)
    assert pack_for_decoding(tiny("gpt2")).lm_head.weight.dtype == torch.float32
    cast = pack_for_decoding(tiny("gpt2"), torch.bfloat16)
    assert type(cast.lm_head) is nn.Linear and cast.lm_head.weight.dtype == torch.bfloat16


def test_auto_precision_follows_the_devices_bf16_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert packed.decoding_dtype("fp32", cpu, 768) == torch.float32
    assert packed.decoding_dtype("bf16", cpu, 768) == torch.bfloat16
    monkeypatch.setattr("kiln.device.cpu_has_fast_bf16", lambda: False)
    assert packed.decoding_dtype("auto", cpu, 768) == torch.float32
    monkeypatch.setattr("kiln.device.cpu_has_fast_bf16", lambda: True)
    assert packed.decoding_dtype("auto", cpu, 768) == torch.bfloat16
    assert packed.decoding_dtype("auto", cpu, 128) == torch.float32  # too narrow to pay
