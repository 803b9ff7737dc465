"""Known words: sampling holds every word to the words the model has read or the prompt holds, ends a word
only when it is whole, and leaves the model's probabilities to choose among what is left."""

from __future__ import annotations

import re

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.data.tokenizers import BPETokenizer
from kiln.data.words import WordCounter, words_of
from kiln.generate.chat import ChatSession
from kiln.generate.known_words import KnownWords, known_words
from kiln.generate.sampling import SamplingConfig, sample_texts, stream_text
from kiln.model.gpt import GPT, GPTConfig

PROMPT = "The zorblax said"


@pytest.fixture(scope="module")
def tokenizer(mirror):
    """A 600-token BPE of The Verdict that knows the words of its first half only."""
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    tokenizer = BPETokenizer.train([text], vocab_size=600)
    tokenizer.words = dict(WordCounter().add_all([text[: len(text) // 2]]).counts)
    return tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    """Untrained: its next token is near uniform, so left free it spells nonsense words."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)
    return GPT(config).eval()


def whole_and_last_words(text: str) -> tuple[list[str], str]:
    """The finished words of `text`, and the one it may end inside of (cut off by max_new_tokens). Special
    tokens (<|user|>, ...) end a word and are no words themselves."""
    text = re.sub(r"<\|[a-z]+\|>", " ", text)
    words = words_of(text)
    ends_inside = bool(re.search(r"[a-zA-Z]$", text))
    return (words[:-1], words[-1]) if ends_inside and words else (words, "")


def test_every_sampled_word_is_known_and_without_the_guard_most_are_not(model, tokenizer):
    known = set(tokenizer.words) | set(words_of(PROMPT))
    free = SamplingConfig(max_new_tokens=120, temperature=1.0, seed=0)
    text = "".join(stream_text(model, tokenizer, PROMPT, free))
    assert sum(w not in known for w in words_of(text)) > 10  # the test can fail: a free model makes words up
    for seed in range(4):
        config = SamplingConfig(max_new_tokens=120, temperature=1.0, seed=seed, known_words=True)
        text = "".join(stream_text(model, tokenizer, PROMPT, config))
        whole, last = whole_and_last_words(text)
        assert len(whole) > 10
        assert [w for w in whole if w not in known] == []
        assert not last or any(w.startswith(last) for w in known)
    assert "zorblax" in known_words(tokenizer).guard(PROMPT).extra  # the prompt's own words count


def test_batched_rows_keep_their_own_words(model, tokenizer):
    config = SamplingConfig(max_new_tokens=60, temperature=1.0, known_words=True)
    texts = sample_texts(model, tokenizer, PROMPT, config, seeds=[1, 2, 3])
    known = set(tokenizer.words) | set(words_of(PROMPT))
    assert len(set(texts)) == 3
    for text in texts:
        assert [w for w in whole_and_last_words(text)[0] if w not in known] == []


def test_a_word_ends_only_when_it_is_whole(tokenizer):
    guard = KnownWords(tokenizer).guard("")
    eos = tokenizer.eos_id
    space, period = tokenizer.encode(" "), tokenizer.encode(".")
    assert guard.allowed("the")[eos] and guard.allowed("")[eos]
    assert not guard.allowed("th")[eos]
    assert not guard.allowed("th")[space].any() and not guard.allowed("th")[period].any()
    assert guard.allowed("the")[space].all()
    to_the = [t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]) == "e"]
    assert to_the and guard.allowed("th")[to_the].all()  # "th" + "e" is a word
    never = [t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]) == "q"]
    assert never and not guard.allowed("th")[never].any()  # no word starts "thq"


def test_a_row_that_cannot_go_on_is_left_free(tokenizer):
    guard = KnownWords(tokenizer).guard("qxz", rows=2)  # the prompt ends inside an unknown word...
    guard.partial[1] = "qxzqxz"  # ...and this row went past it (as max_new_tokens or a bad prompt can leave it)
    logits = torch.zeros(2, tokenizer.vocab_size)
    restricted = guard.restrict(logits)
    assert torch.isinf(restricted[0]).any() and not torch.isinf(restricted[1]).any()


def test_greedy_takes_the_likeliest_allowed_token(model, tokenizer):
    guard = KnownWords(tokenizer).guard("")
    logits = torch.randn(1, tokenizer.vocab_size)
    allowed = guard.allowed("")
    best = int(guard.restrict(logits).argmax())
    assert allowed[best] and logits[0, best] == logits[0, allowed].max()


def test_the_chat_holds_to_known_words_by_default_and_lets_go_when_asked(model, tokenizer, tmp_path):
    folder = save_checkpoint(tmp_path / "ck", model, tokenizer)
    session = ChatSession.from_checkpoint(folder)
    assert session.sampling.known_words
    assert session.tokenizer.words == tokenizer.words  # words.txt came back with the tokenizer
    known = set(tokenizer.words) | set(words_of("Say something."))
    answer = "".join(session.reply("Say something."))
    assert [w for w in whole_and_last_words(answer)[0] if w not in known] == []
    assert session.handle("/set known_words=off") == "known_words=False"
