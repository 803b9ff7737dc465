"""Sampling follows transformers' logits processors exactly; greedy generation with the cache equals
greedy decoding by full recomputation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kiln.errors import ConfigError
from kiln.generate.sampling import SamplingConfig, generate, process_logits
from kiln.model.gpt import GPT, GPTConfig

SETTINGS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.9),
    dict(repetition_penalty=1.3),
    dict(temperature=0.8, top_k=20, top_p=0.85, repetition_penalty=1.2),
    dict(temperature=1.5, top_k=1),
    dict(top_p=0.01),
]


def transformers_processors(s: dict) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if s.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]))
    if s.get("temperature", 1.0) != 1.0:
        processors.append(TemperatureLogitsWarper(s["temperature"]))
    if s.get("top_k"):
        processors.append(TopKLogitsWarper(s["top_k"]))
    if s.get("top_p"):
        processors.append(TopPLogitsWarper(s["top_p"]))
    return processors


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_processed_logits_equal_transformers(settings):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    history = torch.randint(0, 50, (3, 12))
    ours = process_logits(logits, history, SamplingConfig(**settings))
    theirs = transformers_processors(settings)(history, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, block_style="llama")).eval()


def greedy_by_recomputation(model, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt
    for _ in range(steps):
        logits, _ = model(ids[:, -model.config.block_size :])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def test_greedy_generation_with_the_cache_equals_full_recomputation(model):
    prompt = torch.randint(0, 61, (1, 5))
    config = SamplingConfig(max_new_tokens=10, temperature=0)
    assert list(generate(model, prompt, config)) == greedy_by_recomputation(model, prompt, 10)


def test_generation_goes_on_past_the_context_window(model):
    prompt = torch.randint(0, 61, (1, 5))
    tokens = list(generate(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0)))
    assert len(tokens) == 40
    # up to a full window the cached run is exact
    assert tokens[:11] == greedy_by_recomputation(model, prompt, 11)


def test_sampling_is_reproducible_with_a_seed_and_stops_at_a_stop_id(model):
    prompt = torch.randint(0, 61, (1, 4))
    config = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=10, seed=42)
    first, second = list(generate(model, prompt, config)), list(generate(model, prompt, config))
    assert first == second
    stopped = list(generate(model, prompt, config, stop_ids={first[3]}))
    assert stopped == first[: first.index(first[3]) + 1]


def test_top_k_1_is_greedy(model):
    prompt = torch.randint(0, 61, (1, 4))
    sampled = list(generate(model, prompt, SamplingConfig(max_new_tokens=8, top_k=1, seed=3)))
    assert sampled == list(generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0)))


def test_bad_sampling_settings():
    with pytest.raises(ConfigError, match="--top-p 1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="--temperature -1"):
        SamplingConfig(temperature=-1)


def test_stream_text_ends_at_a_stop_string_and_hides_it(mirror, verdict_text):
    from kiln.data.tokenizers import GPT2Tokenizer
    from kiln.generate.sampling import stream_text

    tokenizer = GPT2Tokenizer.resolve(mirror)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    greedy = SamplingConfig(max_new_tokens=20, temperature=0)
    full = "".join(stream_text(model, tokenizer, "The", greedy))
    assert full == tokenizer.decode(list(generate(model, torch.tensor([tokenizer.encode("The")]), greedy)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = "".join(stream_text(model, tokenizer, "The", greedy, stop=[stop]))
    assert cut == full[: full.index(stop)]


@settings(max_examples=300)
@given(
    text=st.text(alphabet="ab#\n", max_size=24),
    stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=4), max_size=2),
)
def test_a_text_stream_shows_all_but_what_may_still_become_a_stop_string(text, stops):
    from kiln.data.tokenizers.char import CharTokenizer
    from kiln.generate.sampling import TextStream

    tokenizer = CharTokenizer("ab#\n")
    stream = TextStream(tokenizer, stops)
    shown = ""
    for i, token in enumerate(tokenizer.encode(text)):
        shown += stream.add(token)
        seen = text[: i + 1]
        hits = [seen.find(s) for s in stops if s in seen]
        if hits:
            assert stream.stopped and shown == seen[: min(hits)]
            break
        # Held back: only the longest end of the text so far that some stop string begins with.
        held = max([n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])], default=0)
        assert shown == seen[: len(seen) - held]
    else:
        assert shown + stream.finish() == text


def test_draws_follow_the_probabilities_and_never_pick_an_id_of_probability_zero():
    from kiln.generate.sampling import draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(probs)
    draws = 20_000
    for _ in range(draws):
        ids = draw(probs, generator)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    assert counts[probs == 0].sum() == 0
    # each share within 4 standard errors of its probability (binomial)
    error = (probs * (1 - probs) / draws).sqrt()
    assert ((counts / draws - probs).abs() <= 4 * error + 1e-12).all()


def test_a_draw_at_the_very_top_of_the_range_still_picks_a_possible_id(monkeypatch):
    from kiln.generate import sampling

    # a uniform draw whose product with the total rounds up to the total itself
    monkeypatch.setattr(sampling.torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=torch.float64))
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert sampling.draw(probs, None).tolist() == [[1]]


def test_seeded_draws_repeat_and_differ_between_seeds():
    from kiln.generate.sampling import draw

    probs = torch.full((1, 1000), 1 / 1000)

    def twenty_draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [int(draw(probs, generator)) for _ in range(20)]

    assert twenty_draws(1) == twenty_draws(1) != twenty_draws(2)
