"""Hold sampled text to words the model has read: a small model sampled at a chat's temperature strings
subword pieces into words that do not exist ("Stoodful", "correctuation"). With `known_words`, a token is
drawn only if the word it starts, goes on with or ends stays a word of the training text (the tokenizer's
words.txt, kiln.data.words) or of the conversation: a word may only end (at a space, punctuation, EOS)
once it is a whole known word, and may only grow while it is the start of one. The model's own
probabilities decide among the tokens left, as transformers' `prefix_allowed_tokens_fn` does with any
rule. Letters are a-z, case folded, as kiln.data.words counts them; other characters end a word and are
never held back themselves.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import torch

from kiln.data.tokenizers import Tokenizer
from kiln.data.words import words_of

_LETTERS = re.compile(r"[a-z]+")


def _prefixes(words: Iterable[str]) -> frozenset[str]:
    return frozenset(word[:end] for word in words for end in range(1, len(word) + 1))


class KnownWords:
    """A tokenizer's pieces, sorted once for the check: pieces of letters only (they grow the current
    word), pieces with a break (they end it, may hold whole words, may start the next), and pieces with
    no text (special tokens: they end it)."""

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.words is None:
            raise ValueError("the tokenizer has no words to hold generation to")
        self.source = tokenizer.words
        self.words = frozenset(tokenizer.words)
        self.prefixes = _prefixes(self.words)
        self.vocab_size = tokenizer.vocab_size
        specials = set(tokenizer.special_tokens.values())
        self.letters: dict[str, list[tuple[int, str]]] = defaultdict(list)  # first letter -> (id, piece)
        self.breaks: list[tuple[int, str, tuple[str, ...], str]] = []  # (id, lead, inner words, trail)
        self.silent: list[int] = []
        for token in range(self.vocab_size):
            text = "" if token in specials else tokenizer.decode([token]).lower()
            if not text:
                self.silent.append(token)
            elif _LETTERS.fullmatch(text):
                self.letters[text[0]].append((token, text))
            else:
                runs = list(_LETTERS.finditer(text))
                lead = runs[0].group() if runs and runs[0].start() == 0 else ""
                trail = runs[-1].group() if runs and runs[-1].end() == len(text) else ""
                inner = tuple(r.group() for r in runs if r.start() > 0 and r.end() < len(text))
                self.breaks.append((token, lead, inner, trail))
        self.leads: dict[str, list[tuple[int, str]]] = defaultdict(list)  # breaks that end a word first
        for token, lead, _, _ in self.breaks:
            if lead:
                self.leads[lead[0]].append((token, lead))
        self.break_ids = torch.tensor([token for token, _, _, _ in self.breaks], dtype=torch.long)
        self.no_lead = torch.tensor([not lead for _, lead, _, _ in self.breaks], dtype=torch.bool)
        self.silent_ids = torch.tensor(self.silent, dtype=torch.long)
        # what each token leaves unfinished: letters add to the word, a break leaves its trailing letters
        self.grows = {token for group in self.letters.values() for token, _ in group}
        self.leaves = {token: text for group in self.letters.values() for token, text in group}
        self.leaves.update({token: trail for token, _, _, trail in self.breaks})

    def guard(self, prompt: str, rows: int = 1, vocab_size: int | None = None) -> WordGuard:
        """A guard for continuing `prompt` (its words count as known) in `rows` rows at once."""
        return WordGuard(self, prompt, rows, vocab_size or self.vocab_size)


def known_words(tokenizer: Tokenizer) -> KnownWords:
    """The sorted pieces of `tokenizer`, built once per tokenizer and its words (for GPT-2's 50,257 tokens,
    a tenth of a second) and kept on it."""
    cached = getattr(tokenizer, "_known_words", None)
    if cached is None or cached.source is not tokenizer.words:
        cached = tokenizer._known_words = KnownWords(tokenizer)
    return cached


class WordGuard:
    """The state of one generation: the word each row is in the middle of, and, per such word, which
    tokens may come next."""

    def __init__(self, known: KnownWords, prompt: str, rows: int, vocab_size: int):
        self.known = known
        self.extra = frozenset(words_of(prompt))  # the conversation's own words: the question's names
        self.extra_prefixes = _prefixes(self.extra)
        tail = re.search(r"[a-z]*$", prompt.lower()).group()  # a prompt may end inside a word
        self.partial = [tail] * rows
        self.vocab_size = max(vocab_size, known.vocab_size)  # a model may have rows past the tokenizer's
        self._blocked: dict[str, torch.Tensor] = {}  # unfinished word -> the tokens that may not follow it
        self._rests_ok = torch.tensor(
            [
                all(self._is_word(w) for w in inner) and (not trail or self._is_prefix(trail))
                for _, _, inner, trail in known.breaks
            ],
            dtype=torch.bool,
        )

    def _is_word(self, word: str) -> bool:
        return word in self.known.words or word in self.extra

    def _is_prefix(self, start: str) -> bool:
        return start in self.known.prefixes or start in self.extra_prefixes

    def allowed(self, partial: str) -> torch.Tensor:
        """[vocab] bools: the tokens that may follow text ending in the unfinished word `partial`."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        ends = not partial or self._is_word(partial)  # the word so far may end here
        growing = self._going_on(partial, self.known.letters, self._is_prefix)
        mask[torch.tensor(growing, dtype=torch.long)] = True
        with_lead = self._going_on(partial, self.known.leads, self._is_word)
        breaking = self._rests_ok & (self.known.no_lead & ends)
        if with_lead:
            breaking |= self._rests_ok & torch.isin(self.known.break_ids, torch.tensor(with_lead, dtype=torch.long))
        mask[self.known.break_ids] = breaking
        mask[self.known.silent_ids] = ends
        return mask

    def _going_on(self, partial: str, by_letter: dict[str, list[tuple[int, str]]], test) -> list[int]:
        """The tokens (first letter -> (id, letters)) whose letters after `partial` pass `test`; a first
        letter that starts no known word rules out its tokens at once."""
        return [
            token
            for letter, pieces in by_letter.items()
            if self._is_prefix(partial + letter)
            for token, letters in pieces
            if test(partial + letters)
        ]

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [rows, V] with the tokens each row may not take set to -inf. A row whose word can go
        nowhere known (the prompt left it so) is left free."""
        blocked = torch.stack([self.blocked(partial) for partial in self.partial])
        return logits.masked_fill(blocked[:, : logits.shape[-1]].to(logits.device), float("-inf"))

    def blocked(self, partial: str) -> torch.Tensor:
        """The tokens that may not follow `partial`, worked out once per answer: none when no token may
        (the row goes free)."""
        if (blocked := self._blocked.get(partial)) is None:
            allowed = self.allowed(partial)
            blocked = self._blocked[partial] = ~allowed if allowed.any() else torch.zeros_like(allowed)
        return blocked

    def advance(self, tokens: list[int]) -> None:
        """Follow each row's new token: its letters grow the word, a break starts the next one."""
        for row, token in enumerate(tokens):
            if token is None:
                continue
            self.partial[row] = self._after(self.partial[row], token)

    def _after(self, partial: str, token: int) -> str:
        left = self.known.leaves.get(token, "")
        return partial + left if token in self.known.grows else left
