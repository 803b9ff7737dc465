"""Word-swapped copies of instruction examples, so a small model learns to carry the question's words
into its answer instead of memorising which words go together.

Most answers restate part of their question ("What is the capital of Sweden?" -> "The capital of Sweden
is Stockholm."). A copy of such an example has each word that its prompt and its answer share (three
letters or more, not a common function word) replaced, in both, by a word drawn from the words that
other training examples share the same way: "What is the capital of Lion?" -> "The capital of Lion is
Stockholm." The copies' facts are nonsense; what they teach is that the answer's word is the question's.
On the demo's 4M-parameter model this took the held-out ROUGE-L from about 0.3 to 0.4 (docs/finetune.md).
Only training examples are copied, never val or test ones.
"""

from __future__ import annotations

import random
import re

from kiln.data.instructions import Conversation, Message

WORD = re.compile(r"[A-Za-z]+")
FUNCTION_WORDS = frozenset(
    "the and for are that this with from its into than then there these those which who whom how why when "  # noqa: SIM905
    "where was were has have had not but can will would should could may might must does did what".split()
)


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
    return Conversation(messages, conversation.source)
