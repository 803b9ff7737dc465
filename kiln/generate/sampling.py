"""Turn logits into the next token the way transformers' `generate` does, and stream tokens with a KV cache:
one sequence, or several continuations of one prompt decoded as one batch.

Processing order and definitions follow transformers: repetition penalty, then temperature, top-k and
top-p. Temperature 0 is greedy: deterministic, no randomness drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from kiln.errors import ConfigError
from kiln.generate.known_words import WordGuard, known_words
from kiln.model.kv_cache import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Hold the words sampled to those the model has read (kiln.generate.known_words), when its tokenizer
    # keeps them (words.txt); a model without them samples freely.
    known_words: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k} must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be above 0 and at most 1")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty {self.repetition_penalty} must be above 0 (1 = off)")


def process_logits(logits: torch.Tensor, history: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Scores for sampling from the last position's logits [B, V], given the tokens so far [B, T].
    Greedy (temperature 0) skips top-k and top-p: they never remove the best token, which is all it takes."""
    scores = logits.float()
    if config.repetition_penalty != 1.0 and history.numel():
        seen = scores.gather(1, history)
        # A seen token's score shrinks towards zero from either side, so it becomes less likely.
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if config.temperature == 0:
        return scores
    scores = scores / config.temperature
    if config.top_k is not None:
        k = min(config.top_k, scores.size(-1))
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - config.top_p)
        drop_sorted[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


def next_token(scores: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B, 1] ids: argmax when greedy, else a draw from softmax(scores)."""
    if config.temperature == 0:
        return scores.argmax(dim=-1, keepdim=True)
    return draw(scores.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, 1] ids, each drawn from its row of probabilities [B, V] by inverting the running total: the id
    where a uniform draw times the row's total falls. One random number a row, where `torch.multinomial`
    draws an exponential for every entry of the vocabulary (about 1 ms a token at GPT-2's 50,257 on a CPU
    core, a fifth of a batch-of-8 decoding step). The total is kept in fp64, so no id with probability
    zero (outside top-k or top-p) can be drawn."""
    totals = probs.double().cumsum(dim=-1)
    uniform = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    ids = torch.searchsorted(totals, uniform * totals[:, -1:], right=True)
    if bool((ids >= probs.shape[-1]).any()):  # uniform * total rounded up to the total: the last possible id
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
        ids = torch.minimum(ids, last)
    return ids


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    config: SamplingConfig,
    stop_ids: set[int] | None = None,
    guard: WordGuard | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt [1, T]; stops at a stop id or max_new_tokens.

    The prompt is prefilled into a KV cache and each step feeds one token. When the context is full,
    the cache is rebuilt from the newest half of the window and generation goes on.
    """
    for tokens in generate_rows(model, prompt, config, [config.seed], stop_ids, guard):
        yield tokens[0]


@torch.no_grad()
def generate_rows(
    model,
    prompt: torch.Tensor,
    config: SamplingConfig,
    seeds: list[int | None],
    stop_ids: set[int] | None = None,
    guard: WordGuard | None = None,
) -> Iterator[list[int | None]]:
    """Continue one prompt [1, T] len(seeds) times at once, the continuations decoded as one batch (rows
    of one KV cache): yield each step's new token of every row, None for a row that has met a stop id.
    Ends when every row has stopped, or after max_new_tokens.

    Row i is `generate` with seed seeds[i]: the prompt is prefilled once and copied to every row, and
    each row draws from its own generator, so its random numbers are the ones a run of its own draws.
    Its logits equal a run of its own up to float rounding (a batch's matrix products add in another
    order), so the texts are the same unless two tokens' scores are within that rounding.

    A `guard` (kiln.generate.known_words) takes out, before any other processing, the tokens that would
    make a word the model has not read.
    """
    model.eval()
    block, rows = model.config.block_size, len(seeds)
    generators = [
        torch.Generator(device=prompt.device).manual_seed(seed) if seed is not None else None for seed in seeds
    ]
    tokens = prompt[:, -block:]
    first = KVCache.for_model(model, batch_size=1, max_len=min(block, tokens.shape[1] + config.max_new_tokens))
    logits = model.decode(tokens, first)[:, -1]
    cache = first.repeat(rows) if rows > 1 else first
    logits, history = logits.expand(rows, -1), prompt.expand(rows, -1)
    stopped = [False] * rows
    for step in range(config.max_new_tokens):
        if guard is not None:
            logits = guard.restrict(logits)
        scores = process_logits(logits, history, config)
        if config.temperature == 0 or rows == 1:
            token = next_token(scores, config, generators[0])
        else:
            token = torch.cat([next_token(scores[i : i + 1], config, g) for i, g in enumerate(generators)])
        history = torch.cat([history, token], dim=1)
        ids = token[:, 0].tolist()
        if guard is not None:
            guard.advance(ids)
        yield [None if done else t for t, done in zip(ids, stopped, strict=True)]
        if stop_ids:
            stopped = [done or t in stop_ids for t, done in zip(ids, stopped, strict=True)]
            if all(stopped):
                return
        if step == config.max_new_tokens - 1:
            return
        if cache.length == block:
            cache.reset()
            logits = model.decode(history[:, -(block // 2) :], cache)[:, -1]
        else:
            logits = model.decode(token, cache)[:, -1]


class TextStream:
    """Token ids in, text out: text is released only once it decodes cleanly, so a character split
    across byte-level tokens is never shown half-made, and a tail that may be the start of a stop
    string is held back; a stop string ends the text and is not shown."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or [] if s]
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string was met

    def add(self, token: int) -> str:
        """The text that `token` makes ready to show (maybe none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character's bytes
        hit = min((text.find(s) for s in self.stop if s in text), default=-1)
        if hit >= 0:
            self.stopped = True
            return self._show(text[:hit])
        hold = max((_partial_stop(text, s) for s in self.stop), default=0)
        return self._show(text[: len(text) - hold] if hold else text)

    def finish(self) -> str:
        """What was held back, once no more tokens come (nothing after a stop string)."""
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`: that much may yet become it."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


def stream_text(
    model, tokenizer, prompt: str | list[int], config: SamplingConfig, stop: list[str] | None = None
) -> Iterator[str]:
    """Yield the continuation of `prompt` (text, or token ids) as text, piece by piece, ending at EOS or
    a stop string (see TextStream)."""
    stream = TextStream(tokenizer, stop)
    stop_ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else None
    ids = _prompt_tensor(model, tokenizer, prompt)
    for token in generate(model, ids, config, stop_ids, word_guard(model, tokenizer, ids, config)):
        if token == tokenizer.eos_id:
            break
        if piece := stream.add(token):
            yield piece
        if stream.stopped:
            return
    if rest := stream.finish():
        yield rest


def sample_texts(
    model,
    tokenizer,
    prompt: str | list[int],
    config: SamplingConfig,
    seeds: list[int | None],
    stop: list[str] | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[str]:
    """One continuation of `prompt` per seed, decoded as one batch (`generate_rows`): text i is what
    `stream_text` shows with seed seeds[i], ending at EOS or a stop string. `on_step` is called per step."""
    streams = [TextStream(tokenizer, stop) for _ in seeds]
    done = [False] * len(seeds)
    stop_ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else None
    ids = _prompt_tensor(model, tokenizer, prompt)
    for tokens in generate_rows(
        model, ids, config, seeds, stop_ids, word_guard(model, tokenizer, ids, config, len(seeds))
    ):
        for token, stream, row in zip(tokens, streams, range(len(seeds)), strict=True):
            if done[row] or token is None or token == tokenizer.eos_id:
                done[row] = True
                continue
            stream.add(token)
            done[row] = stream.stopped
        if on_step:
            on_step()
        if all(done):
            break
    for stream in streams:
        stream.finish()
    return [stream.shown for stream in streams]


def word_guard(model, tokenizer, prompt: torch.Tensor, config: SamplingConfig, rows: int = 1) -> WordGuard | None:
    """The known-words guard for continuing `prompt` [1, T], when the config asks for one and the
    tokenizer keeps the words the model has read; else None."""
    if not config.known_words or tokenizer.words is None:
        return None
    text = tokenizer.decode(prompt[0, -model.config.block_size :].tolist())
    return known_words(tokenizer).guard(text, rows, model.config.vocab_size)


def _prompt_tensor(model, tokenizer, prompt: str | list[int]) -> torch.Tensor:
    """[1, T] ids of `prompt` (text, or ids) on the model's device; an empty prompt starts from EOS."""
    ids = (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) or [
        tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ]
    return torch.tensor([ids], device=next(model.parameters()).device)


def stream_reply(
    model, tokenizer, template, messages: list, config: SamplingConfig, stop: list[str] | None = None
) -> Iterator[str]:
    """The model's next turn after `messages` (kiln.data.instructions.Message), written out with the
    model's prompt template, as streamed text. The prompt is cut from the left to leave room for the
    answer within the context window."""
    from kiln.data.templates import encode_pieces

    ids = encode_pieces(template.render(messages, generation_prompt=True), tokenizer).ids
    room = max(model.config.block_size - config.max_new_tokens, model.config.block_size // 2)
    return stream_text(model, tokenizer, ids[-room:], config, stop)


def print_stream(pieces: Iterable[str]) -> None:
    """Print text as it is generated, then end the line."""
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
