"""Which lessons there are, and running one by number."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError
from kiln.lessons.narrate import Narrator


@dataclass(frozen=True)
class Lesson:
    number: int
    slug: str  # docs/learn/{number}-{slug}.md is the page to read beside it
    title: str
    summary: str
    module: str  # a module with `run(context: LessonContext) -> dict`
    reads_corpus: bool = True  # whether --corpus means anything to it


@dataclass
class LessonContext:
    """What a lesson is given: where to print and save plots, the data mirror, and an optional corpus."""

    narrator: Narrator
    out_dir: Path
    data_dir: str | os.PathLike | None = None
    corpus: str | None = None  # a data-set name or text file, for lessons that read one
    quick: bool = False  # tests: the same steps on less data and fewer iterations


LESSONS: dict[int, Lesson] = {
    lesson.number: lesson
    for lesson in (
        Lesson(
            1,
            "counting",
            "Prediction by counting",
            "character bigram counts in pure Python: probabilities, sampling, held-out loss vs ln(V)",
            "kiln.lessons.counting",
        ),
        Lesson(
            2,
            "numpy-network",
            "A neural network from scratch",
            "NumPy only: neurons, layers, hand-written backprop, SGD on a character model",
            "kiln.lessons.numpy_network",
        ),
        Lesson(
            3,
            "transformer-parts",
            "Transformer parts in PyTorch",
            "embeddings, one causal attention head, multi-head attention, the block, the mini-transformer",
            "kiln.lessons.transformer_parts",
            reads_corpus=False,
        ),
        Lesson(
            4,
            "loss-and-training",
            "Loss and training",
            "cross-entropy, a random model's ln(vocab), loaders with context and stride, a training loop",
            "kiln.lessons.training",
        ),
        Lesson(
            5,
            "your-chatbot",
            "Your chatbot",
            "LoRA fine-tuning on instruction data and a chat, through the package",
            "kiln.lessons.chatbot",
        ),
    )
}


def get_lesson(number: int) -> Lesson:
    if number not in LESSONS:
        raise ConfigError(f"there is no lesson {number}: lessons are 1 to {max(LESSONS)} (`kiln learn` lists them)")
    return LESSONS[number]


def run_lesson(number: int, context: LessonContext) -> dict:
    """Run lesson `number`; returns the figures it printed (for tests and the docs)."""
    lesson = get_lesson(number)
    if context.corpus and not lesson.reads_corpus:
        raise ConfigError(f"lesson {number} reads no corpus (it works on one fixed sentence); drop --corpus")
    context.out_dir.mkdir(parents=True, exist_ok=True)
    context.narrator.title(f"Lesson {lesson.number}: {lesson.title}")
    context.narrator.say(f"Read along: docs/learn/{lesson.number}-{lesson.slug}.md")
    return importlib.import_module(lesson.module).run(context)
