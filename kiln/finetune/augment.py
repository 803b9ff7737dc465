"""Word-swapped copies of instruction examples, so a small model learns to carry the question's words
into its answer instead of memorising which words go together.

Most answers restate part of their question ("What is the capital of Sweden?" -> "The capital of Sweden
is Stockholm."). A copy of such an example has each word that its prompt and its answer share (three
letters or more, not a common function word) replaced, in both, by a word drawn from the words that
other training examples share the same way: "What is the capital of Lion?" -> "The capital of Lion is
Stockholm." The copies' facts are nonsense, so only the answer's words that its question has carry loss
("Stockholm" carries none): what a copy teaches is that the answer's word is the question's, and nothing
against the original's fact. On the demo's model the copies took the held-out ROUGE-L from about 0.3 to
0.4, and taking the loss off their facts to 0.48 (docs/finetune.md).
Only training examples are copied, never val or test ones.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kiln.data.instructions import Conversation, Message
from kiln.data.templates import Encoded
from kiln.data.tokenizers import Tokenizer
from kiln.model.gpt import IGNORE

WORD = re.compile(r"[A-Za-z]+")
ANSWER_WORD = re.compile(r"[A-Za-z0-9]+")  # what a copy's answer may state that its question lacks: numbers too
FUNCTION_WORDS = frozenset(
    "the and for are that this with from its into than then there these those which who whom how why when "  # noqa: SIM905
    "where was were has have had not but can will would should could may might must does did what".split()
)


@dataclass
class SwappedCopy(Conversation):
    """A word-swapped copy of a training example: only its answer's words that its question has carry loss."""


def content_words(text: str) -> set[str]:
    """Lower-cased words of three letters or more that are not common function words."""
    return {w.lower() for w in WORD.findall(text) if len(w) >= 3 and w.lower() not in FUNCTION_WORDS}


def shared_words(conversation: Conversation) -> set[str]:
    """The content words that the prompt (its turns and their inputs) and the answer both use."""
    return content_words(conversation.prompt_text) & content_words(conversation.response)


def with_swapped_words(train: list[Conversation], copies: int, seed: int = 0, originals: int = 1) -> list[Conversation]:
    """`train` (`originals` times over) and, `copies` times over, a word-swapped copy of each example that
    has shared words, in a shuffled order (the same for the same seed). More than one of each original
    keeps its real facts from being drowned out by the copies' nonsense ones."""
    if copies <= 0 and originals == 1:
        return list(train)
    shared = [(conversation, sorted(shared_words(conversation))) for conversation in train]
    pool = sorted({word for _, words in shared for word in words})
    rng = random.Random(seed)
    swapped = []
    for _ in range(copies):
        for conversation, words in shared:
            if words:
                swapped.append(_swapped(conversation, {word: rng.choice(pool) for word in words}))
    mixed = list(train) * originals + swapped
    rng.shuffle(mixed)
    return mixed


def _swapped(conversation: Conversation, mapping: dict[str, str]) -> Conversation:
    def replace(match: re.Match) -> str:
        word = match.group(0)
        new = mapping.get(word.lower())
        if new is None:
            return word
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    def swap(text: str) -> str:
        return WORD.sub(replace, text)

    messages = [Message(m.role, swap(m.content), swap(m.context)) for m in conversation.messages]
    return SwappedCopy(messages, conversation.source)


def without_new_words(labels: list[int], encoded: Encoded, tokenizer: Tokenizer, question: str) -> list[int]:
    """`labels` (next-token labels of `encoded`) with IGNORE for every answer token that spells part of a
    word its question lacks: a swapped copy's facts, which are about the original's words."""
    asked = {word.lower() for word in ANSWER_WORD.findall(question)}
    specials = set(tokenizer.special_tokens.values())
    labels = list(labels)
    run: list[int] = []  # positions of one stretch of answer text (specials end it)
    for position, (token, trainable) in enumerate([*zip(encoded.ids, encoded.trainable, strict=True), (None, False)]):
        if trainable and token not in specials:
            run.append(position)
            continue
        if run:
            for start in _new_word_tokens([encoded.ids[p] for p in run], tokenizer, asked):
                labels[run[start] - 1] = IGNORE  # the label at i is the token at i + 1
            run = []
    return labels


def _new_word_tokens(ids: list[int], tokenizer: Tokenizer, asked: set[str]) -> list[int]:
    """Indexes into `ids` of the tokens whose text overlaps a word that is not in `asked`."""
    prefixes = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]  # exact spans for multi-byte text too
    ends, text = [len(prefix) for prefix in prefixes], prefixes[-1]
    new = [m.span() for m in ANSWER_WORD.finditer(text) if m.group(0).lower() not in asked]
    starts = [0, *ends[:-1]]
    return [i for i, (a, b) in enumerate(zip(starts, ends, strict=True)) if any(a < e and s < b for s, e in new)]
