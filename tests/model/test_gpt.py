"""The GPT: parameter counts, KV-cache parity, reference attention, causality, RoPE, RMSNorm, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.errors import ConfigError
from kiln.model import gpt
from kiln.model.gpt import GPT, Attention, GPTConfig, RMSNorm, apply_rope, rope_tables
from kiln.model.gpt import _RMSNorm as RMSNormFunction
from kiln.model.kv_cache import KVCache
from kiln.model.presets import PRESETS, preset_config

SMALL = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
STYLES = {
    "gpt2": GPTConfig(**SMALL),
    "llama": GPTConfig(**SMALL, block_style="llama", bias=False),
    "llama-gqa": GPTConfig(**SMALL, block_style="llama", bias=False, n_kv_head=2, tie_word_embeddings=False),
}


def model_of(style: str) -> GPT:
    torch.manual_seed(0)
    return GPT(STYLES[style]).eval()


def test_gpt2_124m_has_gpt2s_parameter_count():
    model = GPT(preset_config("gpt2-124m"))
    assert model.num_params() == 124_439_808
    assert model.num_params(exclude_positions=True) == 123_653_376  # nanoGPT prints 123.65M
    assert model.lm_head.weight is model.wte.weight


def test_untied_head_adds_one_embedding_table():
    tied, untied = GPT(GPTConfig(**SMALL)), GPT(GPTConfig(**SMALL, tie_word_embeddings=False))
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_torch_init_draws_each_layer_as_pytorch_does_as_llms_from_scratch_has_it():
    torch.manual_seed(0)
    book = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, tie_word_embeddings=False, init="torch"))
    gpt2 = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, tie_word_embeddings=False))
    assert book.wte.weight.std().item() == pytest.approx(1.0, rel=0.01)  # nn.Embedding: N(0, 1)
    assert book.wpe.weight.std().item() == pytest.approx(1.0, rel=0.05)
    bound = 1 / math.sqrt(256)  # nn.Linear: Kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight in (book.lm_head.weight, book.blocks[0].attn.qkv.weight, book.blocks[1].mlp.up.weight):
        assert weight.abs().max().item() <= bound and weight.std().item() == pytest.approx(
            bound / math.sqrt(3), rel=0.02
        )
    assert gpt2.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)  # the default: GPT-2's
    with pytest.raises(ConfigError, match="init 'xavier': choose one of gpt2, torch"):
        GPTConfig(init="xavier")


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_logits_equal_the_full_forward(style):
    model = model_of(style)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_model(model, batch_size=2)
        pieces = [model.decode(idx[:, :5], cache), model.decode(idx[:, 5:9], cache)]  # prefill, then a chunk
        pieces += [model.decode(idx[:, t : t + 1], cache) for t in range(9, 20)]  # then one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 20


@pytest.mark.parametrize("style", STYLES)
def test_no_position_sees_the_future(style):
    model = model_of(style)
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_equals_the_textbook_formula_with_grouped_heads():
    config = STYLES["llama-gqa"]
    torch.manual_seed(1)
    attn = Attention(config)
    x = torch.randn(2, 7, config.n_embd)
    cos, sin = rope_tables(config, 7)
    q, k, v = attn.qkv(x).split([32, 16, 16], dim=-1)
    q = apply_rope(q.view(2, 7, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(2, 7, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
    v = v.view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x, (cos, sin)), expected, atol=1e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    config = GPTConfig(**SMALL, block_style="llama")
    cos, sin = rope_tables(config, 32)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    torch.testing.assert_close(score(3, 1), score(20, 18))
    torch.testing.assert_close(apply_rope(q, cos[5], sin[5]).norm(), q.norm())


@pytest.mark.parametrize("style", STYLES)
def test_an_untrained_model_predicts_about_uniformly(style):
    model = model_of(style)
    idx = torch.randint(0, 97, (4, 32))
    _, loss = model(idx, targets=torch.randint(0, 97, (4, 32)))
    assert abs(loss.item() - math.log(97)) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sequence_longer_than_the_block_is_refused():
    with pytest.raises(ConfigError, match="longer than block_size 32"):
        model_of("gpt2")(torch.zeros(1, 33, dtype=torch.long))


def test_config_mistakes_are_clear():
    with pytest.raises(ConfigError, match=r"unknown model setting 'n_layers' \(did you mean n_layer\?\)"):
        GPTConfig.from_dict({"n_layers": 4})
    with pytest.raises(ConfigError, match="n_embd 30 is not a multiple of n_head 4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="needs block_style=llama"):
        GPTConfig(n_kv_head=2)
    with pytest.raises(ConfigError, match="block_style 'mamba'"):
        GPTConfig(block_style="mamba")
    with pytest.raises(ConfigError, match="did you mean tiny"):
        preset_config("tiney")


def test_presets_build():
    assert {"tiny", "nanogpt-cpu", "shakespeare-cpu", "gpt2-124m"} <= set(PRESETS)
    tiny = preset_config("tiny", vocab_size=65)
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.vocab_size) == (2, 2, 128, 65)
    assert preset_config("nanogpt-cpu").block_size == 64


def test_a_preset_recipe_is_a_default_that_settings_override():
    from kiln.train.run import build_settings

    run = build_settings("shakespeare-cpu", 65, {"lr": 1e-3}, {"max_time": 60.0})
    assert run.model.block_style == "llama" and run.model.vocab_size == 65
    assert run.optim.lr == 1e-3  # --set wins over the recipe
    assert run.optim.warmup_iters == PRESETS["shakespeare-cpu"].recipe["warmup_iters"]
    assert run.train.max_time == 60.0
    assert build_settings("shakespeare-cpu", 65, {}, {}).optim.lr == PRESETS["shakespeare-cpu"].recipe["lr"]
    assert build_settings("nanogpt-cpu", 65, {}, {}).optim.lr == 1e-3  # no recipe: the defaults


def test_the_lfs_preset_is_the_books_model_and_recipe():
    from kiln.train.run import build_settings

    run = build_settings("lfs-124m", 50257, {}, {"epochs": 10})
    assert (run.model.n_layer, run.model.n_embd, run.model.block_size, run.model.dropout) == (12, 768, 256, 0.1)
    assert not run.model.tie_word_embeddings and run.model.init == "torch"
    assert (run.optim.lr, run.optim.weight_decay, run.train.batch_size) == (5e-4, 0.1, 2)
    assert GPT(run.model).num_params() == 162_419_712 + 12 * 3 * 768  # the book's, with query/key/value biases


def rope_by_concatenation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' Llama form: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_rope_and_its_hand_written_backward_match_autograd_of_the_concatenation_form():
    config = GPTConfig(**SMALL, block_style="llama")
    cos, sin = (t.unsqueeze(1) for t in rope_tables(config, 7))  # (time, 1, head_dim): broadcast over heads
    torch.manual_seed(2)
    x, grad = torch.randn(2, 7, 6, 8, requires_grad=True), torch.randn(2, 7, 6, 8)
    reference = x.detach().clone().requires_grad_()
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_by_concatenation(reference, cos, sin))
    (got,) = torch.autograd.grad(apply_rope(x, cos, sin), x, grad)
    (expected,) = torch.autograd.grad(rope_by_concatenation(reference, cos, sin), reference, grad)
    torch.testing.assert_close(got, expected)
    x64 = torch.randn(1, 7, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double()), (x64,))


def test_rms_norm_and_its_hand_written_backward_match_autograd_of_the_formula():
    torch.manual_seed(3)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, grad = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16)
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    expected_y = x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * w_ref
    y = norm(x)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, [16], norm.weight, 1e-5))
    got = torch.autograd.grad(y, (x, norm.weight), grad)
    expected = torch.autograd.grad(expected_y, (x_ref, w_ref), grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    # A frozen weight (LoRA) gets no gradient, and the input's is unchanged.
    norm.weight.requires_grad_(False)
    x_frozen = x.detach().clone().requires_grad_()
    norm(x_frozen).backward(grad)
    assert norm.weight.grad is None
    torch.testing.assert_close(x_frozen.grad, got[0])
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x64[:1, :2], w64))


def test_attention_with_dropout_keeps_no_score_matrix_and_gives_the_same_gradients(monkeypatch):
    """On a CPU, attention with dropout has no fused kernel; the model keeps q, k, v and recomputes the
    [T, T] scores in backward with the same dropout mask."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    model = GPT(config).train()
    idx = torch.randint(0, 50, (2, 32))

    def loss_and_grads():
        torch.manual_seed(7)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            _, loss = model(idx, idx)
        model.zero_grad()
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()], shapes

    loss, grads, shapes = loss_and_grads()
    assert not any(shape[-2:] == (32, 32) for shape in shapes)
    monkeypatch.setattr(gpt, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # attention kept whole
    plain_loss, plain_grads, plain_shapes = loss_and_grads()
    assert any(shape[-2:] == (32, 32) for shape in plain_shapes)  # what the checkpoint spares
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for ours, theirs in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, theirs)
