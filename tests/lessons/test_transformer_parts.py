"""Lesson 3: every hand-written part computes what the package's model computes, on the same weights."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from kiln.lessons.catalog import LessonContext
from kiln.lessons.narrate import Narrator
from kiln.lessons.transformer_parts import (
    CONFIG,
    CausalSelfAttentionHead,
    MultiHeadAttention,
    ShapeLog,
    TokenAndPositionEmbedding,
    TransformerBlock,
    build_reference,
    fused_attention,
    future_mask,
    load_block,
    load_embedding,
    load_head,
    load_mini_transformer,
    load_multi_head,
    mini_transformer_for,
    one_head_attention,
    run,
)
from kiln.model.gpt import Attention, Block

TOLERANCE = 1e-5
WIDTH = CONFIG.n_embd


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def x() -> torch.Tensor:
    """A random batch of 2 sequences of 7 vectors, spread like normalized activations."""
    return torch.randn(2, 7, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference():
    return build_reference()


@pytest.fixture(scope="module")
def lesson_model(reference):
    """The lesson's mini-transformer holding the reference GPT's weights."""
    model = mini_transformer_for(CONFIG)
    with torch.no_grad():
        load_mini_transformer(model, reference)
    return model


def random_attention(n_head: int, seed: int) -> Attention:
    torch.manual_seed(seed)
    return Attention(replace(CONFIG, n_head=n_head)).eval()


def test_one_head_equals_a_one_head_package_attention(x):
    attention = random_attention(n_head=1, seed=1)
    head = CausalSelfAttentionHead(WIDTH, WIDTH)
    load_head(head, attention, 0)
    assert largest(attention.proj(head(x)), attention(x, None)) < TOLERANCE


def test_multi_head_equals_package_attention(x):
    attention = random_attention(n_head=CONFIG.n_head, seed=2)
    lesson = MultiHeadAttention(WIDTH, CONFIG.n_head)
    load_multi_head(lesson, attention)
    expected = attention(x, None)
    assert largest(lesson(x), expected) < TOLERANCE
    assert largest(fused_attention(attention, x), expected) < TOLERANCE


def test_block_equals_package_block(x):
    torch.manual_seed(3)
    block = Block(CONFIG).eval()
    for p in block.parameters():  # LayerNorms start at 1 and 0; move them so the test covers their weights
        p.add_(0.1 * torch.randn_like(p))
    lesson = TransformerBlock(WIDTH, CONFIG.n_head)
    load_block(lesson, block)
    assert largest(lesson(x), block(x, None)) < TOLERANCE


def test_embeddings_and_mini_transformer_logits_equal_gpt(reference, lesson_model):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    embedding = TokenAndPositionEmbedding(CONFIG.vocab_size, CONFIG.block_size, WIDTH)
    load_embedding(embedding, reference)
    assert largest(embedding(ids), reference._embed(ids, 0)[0]) < TOLERANCE
    logits = lesson_model(ids)
    assert logits.shape == (2, 9, CONFIG.vocab_size)
    assert largest(logits, reference(ids)[0]) < TOLERANCE


def test_the_mask_hides_the_future(x, lesson_model):
    head = CausalSelfAttentionHead(WIDTH, 16)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 3, WIDTH)
    before, after = head(x), head(changed)
    assert torch.equal(before[:, :4], after[:, :4])
    assert largest(before[:, 4:], after[:, 4:]) > 1e-3

    ids = torch.tensor([[10, 20, 30, 40, 50]])
    later = ids.clone()
    later[0, -1] = 60
    assert largest(lesson_model(ids)[:, :-1], lesson_model(later)[:, :-1]) == 0.0


def test_attention_rows_sum_to_one_and_skip_the_future(x):
    attention = one_head_attention()
    head = CausalSelfAttentionHead(WIDTH, WIDTH)
    load_head(head, attention, 0)
    weights = head.attention_weights(x)
    assert weights.shape == (2, 7, 7)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 7))
    assert torch.all(weights.triu(diagonal=1) == 0)
    assert torch.all(weights.masked_select(~future_mask(7)) > 0)  # softmax never gives exactly 0 to the past


def test_trace_records_every_shape(x):
    log = ShapeLog()
    CausalSelfAttentionHead(WIDTH, 16)(x, log)
    shapes = dict(log.rows)
    assert shapes["queries q"] == (2, 7, 16)
    assert shapes["weights softmax(scores)"] == (2, 7, 7)
    assert shapes["future mask"] == (7, 7)
    assert shapes["output weights @ v"] == (2, 7, 16)


def test_run_quick_returns_its_figures_and_writes_its_plot(tmp_path, mirror):
    console = Console(file=io.StringIO(), width=120)
    figures = run(LessonContext(Narrator(tmp_path, console), tmp_path, data_dir=mirror, quick=True))

    assert figures["tokens"] == ["Your", "journey", "starts", "with", "one", "step"]
    assert set(figures["max_difference"]) == {
        "embeddings",
        "one head",
        "multi-head",
        "fused queries",
        "fused vs heads",
        "block",
        "mini-transformer",
    }
    assert max(figures["max_difference"].values()) < TOLERANCE
    weights = torch.tensor(figures["attention_weights"])
    assert torch.allclose(weights.sum(dim=-1), torch.ones(6))
    assert figures["future_change"]["earlier"] == 0.0 < figures["future_change"]["last"]
    assert dict(figures["shapes"]["mini-transformer"])["logits"] == (1, 6, CONFIG.vocab_size)
    assert dict(figures["shapes"]["fused"])["q as (batch, head, T, size)"] == (1, CONFIG.n_head, 6, CONFIG.head_dim)
    assert (tmp_path / "attention-weights.png").stat().st_size > 1000
    assert "Step 8." in console.file.getvalue()
