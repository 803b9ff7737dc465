"""A model packed for decoding computes what the plain model computes: fp32 (transposed weights) within
float rounding, fp16 and bf16 weights within their rounding; the activations between the products stay fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.generate.sampling import SamplingConfig, generate
from kiln.model import packed
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.kv_cache import KVCache
from kiln.model.packed import Fp16Linear, PackedLinear, TransposedLinear, pack_for_decoding

onednn = pytest.mark.skipif(not packed.onednn_available("cpu"), reason="this torch has no oneDNN")
onednn_bf16 = pytest.mark.skipif(
    not packed.onednn_available("cpu", torch.bfloat16), reason="oneDNN's bf16 product needs AVX-512 or AVX-NE-CONVERT"
)
fbgemm = pytest.mark.skipif(not packed.fbgemm_available("cpu"), reason="this torch has no fbgemm (x86 only)")


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


@pytest.mark.parametrize("rows,layer", [(1, TransposedLinear), pytest.param(2, PackedLinear, marks=onednn)])
@pytest.mark.parametrize("style,tied", [("gpt2", True), ("llama", True), ("gpt2", False)])
def test_fp32_decoding_equals_the_plain_full_forward(style, tied, rows, layer):
    model = tiny(style, tied)
    ids = torch.randint(0, 61, (2, 12))
    reference, _ = model(ids)
    fast = pack_for_decoding(copy.deepcopy(model), "fp32", rows=rows)
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert any(isinstance(m, layer) for m in fast.modules())
    torch.testing.assert_close(cached_logits(fast, ids), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "precision,layer,bits",
    [pytest.param("fp16", Fp16Linear, 11, marks=fbgemm), pytest.param("bf16", PackedLinear, 8, marks=onednn_bf16)],
)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_half_precision_decoding_is_within_its_rounding(style, precision, layer, bits):
    model = tiny(style)
    ids = torch.randint(0, 61, (1, 12))
    reference, _ = model(ids)
    fast = pack_for_decoding(copy.deepcopy(model), precision)
    assert {type(m) for m in fast.modules() if not list(m.children())} & {nn.Linear, layer} == {layer}
    logits = cached_logits(fast, ids)
    assert logits.dtype == torch.float32
    # a weight rounded to `bits` significant bits is off by up to 2^-bits of itself
    assert (logits - reference).abs().max() < 2**-bits * 20 * reference.abs().max()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=fbgemm)])
def test_greedy_text_of_a_packed_model_is_the_plain_models(precision):
    model = tiny("gpt2")
    prompt = torch.randint(0, 61, (1, 5))
    config = SamplingConfig(max_new_tokens=40, temperature=0)  # past the 32-token window, too
    expected = list(generate(model, prompt, config))
    assert list(generate(pack_for_decoding(copy.deepcopy(model), precision), prompt, config)) == expected


@fbgemm
def test_fp16_refuses_weights_past_its_range():
    model = tiny("gpt2")
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = 1e5
    with pytest.raises(ConfigError, match="past fp16's range"):
        pack_for_decoding(model, "fp16")


def test_without_the_cpu_kernels_half_precisions_cast_the_model(monkeypatch):
    monkeypatch.setattr(packed, "onednn_available", lambda device, dtype=torch.float32: False)
    cast = pack_for_decoding(tiny("gpt2"), "bf16")
    assert type(cast.lm_head) is nn.Linear and cast.lm_head.weight.dtype == torch.bfloat16
    monkeypatch.setattr(packed, "fbgemm_available", lambda device: False)
    with pytest.raises(ConfigError, match="fbgemm"):
        pack_for_decoding(tiny("gpt2"), "fp16")


def test_bf16_on_a_cpu_whose_onednn_has_no_bf16_product_casts_the_model_and_decodes(monkeypatch):
    # AVX2-only CPUs: oneDNN's bf16 reorder raises there, so bf16 falls back to torch's own products.
    monkeypatch.setattr(packed, "_onednn_bf16_supported", lambda: False)
    model = tiny("llama")
    ids = torch.randint(0, 61, (1, 12))
    reference, _ = model(ids)
    monkeypatch.setattr(packed, "FP16_MIN_BYTES", 0)
    monkeypatch.setattr(packed, "cpu_has_fast_bf16", lambda: True)
    assert packed.decoding_precision(model, packed.BF16_MIN_ROWS)[0] != "bf16"  # auto never picks it there
    cast = pack_for_decoding(copy.deepcopy(model), "bf16", rows=packed.BF16_MIN_ROWS)
    assert not any(type(m) is PackedLinear for m in cast.modules())
    assert cast.lm_head.weight.dtype == torch.bfloat16
    logits = cached_logits(cast, ids).float()
    assert (logits - reference).abs().max() < 2**-8 * 20 * reference.abs().max()


def test_auto_keeps_fp32_where_the_weights_fit_in_cache_and_off_fbgemm(monkeypatch):
    model = tiny("gpt2")
    assert packed.decoding_precision(model) == ("fp32", "the weights fit in cache")
    assert all(type(m) is not Fp16Linear for m in pack_for_decoding(copy.deepcopy(model), "auto").modules())
    monkeypatch.setattr(packed, "FP16_MIN_BYTES", 0)
    monkeypatch.setattr(packed, "fbgemm_available", lambda device: False)
    assert packed.decoding_precision(model)[0] == "fp32"


@fbgemm
def test_auto_decodes_big_weights_in_fp16_unless_one_is_past_its_range(monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(packed, "FP16_MIN_BYTES", 0)  # as if the model were too big for the caches
    assert packed.decoding_precision(model)[0] == "fp16"
    fast = pack_for_decoding(copy.deepcopy(model), "auto")
    assert {type(m) for m in fast.modules() if not list(m.children())} & {nn.Linear, Fp16Linear} == {Fp16Linear}
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = 1e5
    assert packed.decoding_precision(model) == ("fp32", "a weight is past fp16's range")
    assert not any(type(m) is Fp16Linear for m in pack_for_decoding(model, "auto").modules())


def test_auto_decodes_a_big_batch_in_bf16_only_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(packed, "FP16_MIN_BYTES", 0)  # as if the model were too big for the caches
    monkeypatch.setattr(packed, "cpu_has_fast_bf16", lambda: True)
    rows = packed.BF16_MIN_ROWS
    if packed.onednn_available("cpu", torch.bfloat16):
        assert packed.decoding_precision(model, rows)[0] == "bf16"
        fast = pack_for_decoding(copy.deepcopy(model), "auto", rows=rows)
        assert {m.dtype for m in fast.modules() if type(m) is packed.PackedLinear} == {torch.bfloat16}
    assert packed.decoding_precision(model, rows - 1)[0] != "bf16"  # fewer rows stream the weights
    monkeypatch.setattr(packed, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 is slower than fp16
    assert packed.decoding_precision(model, rows)[0] != "bf16"
