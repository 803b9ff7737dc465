"""Corpus metrics score every token once and equal a direct computation with the model's forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.errors import ConfigError, DataError
from kiln.evaluate.perplexity import _windows, corpus_metrics
from kiln.model.gpt import GPT, GPTConfig

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


def make_model(vocab_size: int, block_size: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture()
def tokenizer():
    return CharTokenizer(set(TEXT + "café5€"), specials=[EOS])


def nats_of(model: GPT, context: list[int], target: int) -> float:
    """-log p(target | context) from one plain forward pass."""
    logits, _ = model(torch.tensor([context]))
    return -F.log_softmax(logits[0, -1].double(), dim=-1)[target].item()


def test_one_window_equals_the_forward_loss(tokenizer):
    text = TEXT[:30]
    model = make_model(tokenizer.vocab_size, block_size=32)
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    metrics = corpus_metrics(model, tokenizer, text)
    assert metrics.tokens == len(text)
    assert metrics.loss == pytest.approx(loss.item(), rel=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_windows_without_overlap_score_each_token_from_its_own_window(tokenizer):
    model = make_model(tokenizer.vocab_size, block_size=32)
    text = TEXT[:80]  # 80 targets: ten full windows of 8
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    block = 8
    expected = sum(nats_of(model, ids[j - 1 - (j - 1) % block : j], ids[j]) for j in range(1, len(ids)))
    metrics = corpus_metrics(model, tokenizer, text, block_size=block, batch_size=3)
    assert metrics.tokens == len(ids) - 1 == len(text)
    assert metrics.loss * metrics.tokens == pytest.approx(expected, rel=1e-5)


def test_a_last_short_window_reaches_back_for_context(tokenizer):
    model = make_model(tokenizer.vocab_size, block_size=32)
    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT[:20])]
    # Targets 1-8 and 9-16 come from windows ids[0:8] and ids[8:16]; targets 17-20 from ids[12:20].
    starts = [0] * 8 + [8] * 8 + [12] * 4
    expected = sum(nats_of(model, ids[start:j], ids[j]) for j, start in zip(range(1, 21), starts, strict=True))
    metrics = corpus_metrics(model, tokenizer, TEXT[:20], block_size=8)
    assert metrics.loss * metrics.tokens == pytest.approx(expected, rel=1e-5)


def test_stride_one_predicts_every_token_from_a_full_window(tokenizer):
    model = make_model(tokenizer.vocab_size, block_size=32)
    ids = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    block = 8
    expected = sum(nats_of(model, ids[max(0, j - block) : j], ids[j]) for j in range(1, len(ids)))
    metrics = corpus_metrics(model, tokenizer, TEXT, block_size=block, stride=1, batch_size=16)
    assert metrics.tokens == len(TEXT)
    assert metrics.loss * metrics.tokens == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n", "block", "stride"), [(2, 4, 4), (10, 4, 4), (11, 4, 3), (50, 8, 1), (9, 8, 8)])
def test_windows_cover_every_target_once_within_the_context(n, block, stride):
    scored = []
    for start, first, end in _windows(n, block, stride):
        assert end - 1 - start <= block and start < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_bits_per_byte_counts_utf8_bytes(tokenizer):
    text = "café, 5€ " * 4  # é is 2 bytes and € 3 in UTF-8
    model = make_model(tokenizer.vocab_size)
    metrics = corpus_metrics(model, tokenizer, text, block_size=16)
    assert metrics.bytes == len(text.encode("utf-8")) == len(text) + 3 * 4
    assert metrics.bits_per_byte == pytest.approx(metrics.loss * metrics.tokens / math.log(2) / metrics.bytes)


def test_without_eos_the_first_token_is_context_only():
    tokenizer = CharTokenizer(set(TEXT))
    model = make_model(tokenizer.vocab_size)
    ids = tokenizer.encode(TEXT[:20])
    _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    metrics = corpus_metrics(model, tokenizer, TEXT[:20])
    assert (metrics.tokens, metrics.bytes) == (19, 19)
    assert metrics.loss == pytest.approx(loss.item(), rel=1e-5)


def test_documents_are_joined_with_eos_as_prepare_joins_them(tokenizer):
    model = make_model(tokenizer.vocab_size)
    documents = ["To be, or not", "that is the question"]
    joined = corpus_metrics(model, tokenizer, documents, block_size=8)
    one_text = corpus_metrics(model, tokenizer, f"To be, or not{EOS}that is the question", block_size=8)
    assert joined.tokens == one_text.tokens == len("".join(documents)) + 1
    assert joined.loss == pytest.approx(one_text.loss, rel=1e-6)
    assert joined.bytes == len("".join(documents))


def test_an_untrained_model_is_as_unsure_as_uniform(shakespeare_text):
    tokenizer = CharTokenizer(set(shakespeare_text), specials=[EOS])
    model = make_model(tokenizer.vocab_size, block_size=64)
    metrics = corpus_metrics(model, tokenizer, shakespeare_text[:3000])
    assert metrics.loss == pytest.approx(math.log(tokenizer.vocab_size), abs=0.05)


def test_bad_windows_and_empty_text_are_refused(tokenizer):
    model = make_model(tokenizer.vocab_size, block_size=16)
    with pytest.raises(ConfigError, match="block_size 32"):
        corpus_metrics(model, tokenizer, TEXT, block_size=32)
    with pytest.raises(ConfigError, match="stride 9"):
        corpus_metrics(model, tokenizer, TEXT, block_size=8, stride=9)
    with pytest.raises(DataError, match="too short"):
        corpus_metrics(model, CharTokenizer(set(TEXT)), "T")
