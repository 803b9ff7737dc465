"""Lesson 1: prediction by counting. Character bigrams in pure Python (lists, dicts, `math`, `random`).

The whole model is a table: for each character, how often each other character came next. Normalise its
rows and it predicts; sample from it and it writes; score it on text it never saw and it can be compared
with any other model by one number, the average negative log-likelihood in nats.

Lesson 2 reuses the functions here (split, vocabulary, encoding, bigram NLL), so its network is scored
on the very same held-out characters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from rich.markup import escape

from kiln.lessons.catalog import LessonContext
from kiln.lessons.text import lesson_text

UNK = "<unk>"  # the one vocabulary slot for every held-out character that training never showed
TRAIN_FRACTION = 0.9
MIN_CHARS = 10_000  # below this the held-out tenth is too short to say anything
MAX_CHARS = 2_000_000  # pure-Python counting stays a few seconds even on a large corpus
QUICK_CHARS = 200_000
HEATMAP_CHARS = 28
SAMPLE_LENGTH = 240
SEED = 1337


def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """The first `train_fraction` of the text to learn from, the rest held out to score on."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def build_vocabulary(train_text: str) -> list[str]:
    """Every character of the training text, sorted, then UNK for anything else."""
    return sorted(set(train_text)) + [UNK]


def encode(text: str, vocabulary: Sequence[str]) -> list[int]:
    """Each character's position in the vocabulary; characters outside it become UNK's position."""
    index = {char: i for i, char in enumerate(vocabulary)}
    unk = index[UNK]
    return [index.get(char, unk) for char in text]


def unseen_characters(text: str, vocabulary: Sequence[str]) -> dict[str, int]:
    """How often each character of `text` that is not in the vocabulary occurs (these are read as UNK)."""
    known = set(vocabulary)
    unseen: dict[str, int] = {}
    for char in text:
        if char not in known:
            unseen[char] = unseen.get(char, 0) + 1
    return unseen


def count_bigrams(ids: Sequence[int], size: int) -> list[list[int]]:
    """counts[a][b]: how many times id b came right after id a."""
    counts = [[0] * size for _ in range(size)]
    for current, following in zip(ids, ids[1:], strict=False):
        counts[current][following] += 1
    return counts


def probability_table(counts: Sequence[Sequence[int]], smoothing: float = 1.0) -> list[list[float]]:
    """Each row of counts turned into probabilities, with `smoothing` pretend sightings of every pair.

    With smoothing 0 a pair never seen in training gets probability 0; with add-one smoothing every
    pair keeps a little probability, so no held-out text can be 'impossible'.
    A row never seen at all (e.g. UNK's) becomes uniform when smoothed, and stays all zeros when not.
    """
    size = len(counts)
    table = []
    for row in counts:
        total = sum(row) + smoothing * size
        table.append([(count + smoothing) / total if total else 0.0 for count in row])
    return table


def unigram_probabilities(ids: Sequence[int], size: int, smoothing: float = 1.0) -> list[float]:
    """How often each id occurs, as probabilities: a model that ignores context altogether."""
    counts = [0] * size
    for i in ids:
        counts[i] += 1
    total = len(ids) + smoothing * size
    return [(count + smoothing) / total for count in counts]


def average_nll(table: Sequence[Sequence[float]], ids: Sequence[int]) -> float:
    """Mean of -ln P(next | current) over every consecutive pair of ids; inf if any pair has probability 0."""
    total = 0.0
    for current, following in zip(ids, ids[1:], strict=False):
        p = table[current][following]
        if p == 0.0:
            return math.inf
        total -= math.log(p)
    return total / (len(ids) - 1)


def unigram_nll(probabilities: Sequence[float], ids: Sequence[int]) -> float:
    """Mean of -ln P(id) over the same predictions average_nll makes (every id but the first)."""
    return -sum(math.log(probabilities[i]) for i in ids[1:]) / (len(ids) - 1)


def uniform_nll(vocabulary_size: int) -> float:
    """The NLL of guessing every character equally likely: ln(V), whatever the text."""
    return math.log(vocabulary_size)


def most_likely_next(
    table: Sequence[Sequence[float]], vocabulary: Sequence[str], char: str, k: int = 5
) -> list[tuple[str, float]]:
    """The k characters most likely to follow `char`, with their probabilities."""
    row = table[vocabulary.index(char)]
    best = sorted(range(len(row)), key=lambda j: row[j], reverse=True)[:k]
    return [(vocabulary[j], row[j]) for j in best]


def sample(table: Sequence[Sequence[float]], vocabulary: Sequence[str], start: str, length: int, seed: int) -> str:
    """`length` characters drawn one at a time, each from the table row of the character before it."""
    rng = random.Random(seed)
    choices = range(len(vocabulary))
    current = vocabulary.index(start)
    out = []
    for _ in range(length):
        current = rng.choices(choices, weights=table[current])[0]
        out.append(vocabulary[current])
    return "".join(out)


def most_frequent(ids: Sequence[int], k: int) -> list[int]:
    """The k ids that occur most often, most frequent first."""
    frequency: dict[int, int] = {}
    for i in ids:
        frequency[i] = frequency.get(i, 0) + 1
    return sorted(frequency, key=lambda i: frequency[i], reverse=True)[:k]


def printable(char: str) -> str:
    """A character as a reader can see it: space and newline get visible names."""
    return {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, char)


def _draw_heatmap(context: LessonContext, table, vocabulary, chosen: list[int]):
    from kiln.lessons.narrate import new_figure

    figure, axis = new_figure(8.5, 7.5)
    grid = [[table[a][b] for b in chosen] for a in chosen]
    image = axis.imshow(grid, cmap="Blues", vmin=0.0)
    labels = [printable(vocabulary[i]) for i in chosen]
    axis.set_xticks(range(len(chosen)), labels)
    axis.set_yticks(range(len(chosen)), labels)
    axis.set_xlabel("next character")
    axis.set_ylabel("current character")
    axis.set_title(f"P(next | current) for the {len(chosen)} most frequent characters")
    figure.colorbar(image, ax=axis, shrink=0.8, label="probability")
    return context.narrator.plot(figure, "bigram_heatmap")


def run(context: LessonContext) -> dict:
    say, show, n = context.narrator.say, context.narrator.show, context.narrator

    n.step("Read the text")
    spec = context.corpus or "tinyshakespeare"
    text = lesson_text(spec, context.data_dir, MIN_CHARS, QUICK_CHARS if context.quick else MAX_CHARS)
    show("corpus", spec)
    show("characters", f"{len(text):,}")
    say(f"  It starts: [italic]{escape(repr(text[:60]))}[/]")

    n.step("Split it 90/10: learn from the first part, score on the rest")
    train_text, heldout_text = split_text(text)
    show("training characters", f"{len(train_text):,}")
    show("held-out characters", f"{len(heldout_text):,}")
    say("  The held-out tenth is never counted: it tells us how well the counts predict text they have not seen.")

    n.step("The vocabulary: every character the training text uses, plus <unk>")
    vocabulary = build_vocabulary(train_text)
    unseen = unseen_characters(heldout_text, vocabulary)
    size = len(vocabulary)
    show("V (vocabulary size)", f"{size} = {size - 1} characters + {UNK}")
    show("held-out characters never seen in training", sum(unseen.values()))
    say(
        f"  A held-out character training never showed is read as {UNK}: the model can only predict symbols"
        " it has a row and a column for, and one shared slot keeps V fixed by the training text alone."
    )
    train_ids, heldout_ids = encode(train_text, vocabulary), encode(heldout_text, vocabulary)

    n.step("Count which character follows which")
    counts = count_bigrams(train_ids, size)
    seen_pairs = sum(1 for row in counts for c in row if c)
    show("pairs counted", f"{len(train_ids) - 1:,}")
    show("different pairs seen", f"{seen_pairs:,} of {size * size:,} possible")
    top = sorted(((c, a, b) for a, row in enumerate(counts) for b, c in enumerate(row)), reverse=True)[:6]
    n.table(
        ["most common pairs", "times"],
        [(escape(printable(vocabulary[a]) + printable(vocabulary[b])), f"{c:,}") for c, a, b in top],
    )

    n.step("Turn counts into probabilities, with add-one smoothing")
    raw = probability_table(counts, smoothing=0.0)
    table = probability_table(counts, smoothing=1.0)
    never = sum(1 for a, b in zip(heldout_ids, heldout_ids[1:], strict=False) if counts[a][b] == 0)
    show("held-out pairs never seen in training", f"{never:,}")
    say(
        "  Dividing each row by its total gives P(next | current). But a pair never counted would get"
        " probability 0, and one such pair in the held-out text makes its NLL infinite (-ln 0)."
        " Add-one smoothing pretends every pair was seen once more: nothing is impossible, and the"
        " well-counted rows barely move."
    )
    show("largest |row sum - 1|", f"{max(abs(sum(row) - 1.0) for row in table):.1e}")
    rows = []
    for char in [c for c in ("q", " ", "e", "\n") if c in vocabulary]:
        row_total = sum(counts[vocabulary.index(char)])
        guesses = "  ".join(f"{printable(c)} {p:.2f}" for c, p in most_likely_next(table, vocabulary, char))
        rows.append((escape(printable(char)), f"{row_total:,}", escape(guesses)))
    n.table(["after", "times seen", "most likely next (probability)"], rows, title="rows of the table")
    if "q" in vocabulary and "u" in vocabulary:
        q, u = vocabulary.index("q"), vocabulary.index("u")
        say(
            f"  Smoothing costs rare rows most: 'q' -> 'u' is {raw[q][u]:.3f} as counted, {table[q][u]:.3f} smoothed,"
            f" because {size} pretend sightings are large beside {sum(counts[q]):,} real ones."
        )

    n.step("Draw the table as a heat map")
    heatmap = _draw_heatmap(context, table, vocabulary, most_frequent(train_ids, min(HEATMAP_CHARS, size)))
    say("  Each row is one current character; darker cells are likelier next characters.")

    n.step("Write with it: sample one character at a time")
    start = "\n" if "\n" in vocabulary else vocabulary[0]
    text_sample = sample(table, vocabulary, start, SAMPLE_LENGTH, SEED)
    show("seed", SEED)
    say(f"[italic]{escape(text_sample)}[/]")
    say("  Letter pairs look right; words do not. One character of context is all this model has.")

    n.step("Score it: average negative log-likelihood (nats per character)")
    uniform = uniform_nll(size)
    unigram = unigram_nll(unigram_probabilities(train_ids, size), heldout_ids)
    train_nll = average_nll(table, train_ids)
    heldout_nll = average_nll(table, heldout_ids)
    unsmoothed = average_nll(raw, heldout_ids)
    n.table(
        ["model", "NLL (nats)", "as unsure as choosing among"],
        [
            (f"uniform guess, ln(V) = ln({size})", f"{uniform:.4f}", f"{size} characters"),
            ("character frequencies, no context (held-out)", f"{unigram:.4f}", f"{math.exp(unigram):.1f}"),
            ("bigram counts, training text", f"{train_nll:.4f}", f"{math.exp(train_nll):.1f}"),
            ("bigram counts, held-out text", f"{heldout_nll:.4f}", f"{math.exp(heldout_nll):.1f}"),
            ("bigram without smoothing, held-out", f"{unsmoothed:.4f}", "-" if math.isinf(unsmoothed) else ""),
        ],
    )
    say(
        "  NLL is -ln of the probability the model gave the character that really came next, averaged."
        f" Guessing blindly costs ln(V) = {uniform:.3f}; counting pairs brings held-out text down to"
        f" {heldout_nll:.3f}. Lesson 2 trains a network that sees more than one character back and beats it."
    )
    return {
        "corpus": spec,
        "characters": len(text),
        "train_characters": len(train_text),
        "heldout_characters": len(heldout_text),
        "vocab_size": size,
        "unseen_heldout_characters": sum(unseen.values()),
        "heldout_pairs_never_seen": never,
        "uniform_nll": uniform,
        "unigram_heldout_nll": unigram,
        "train_nll": train_nll,
        "heldout_nll": heldout_nll,
        "unsmoothed_heldout_nll": unsmoothed,
        "sample": text_sample,
        "seed": SEED,
        "heatmap": heatmap,
    }
