"""Conversations to token examples, and examples to padded batches.

Each batch is padded only to its own longest example (dynamic padding); padding and, unless asked
otherwise, prompt tokens get the label -100, which the loss ignores.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.instructions import Conversation
from kiln.data.templates import Template, encode_pieces, fit_to_context
from kiln.data.tokenizers import Tokenizer
from kiln.errors import DataError
from kiln.finetune.augment import SwappedCopy, without_new_words
from kiln.model.gpt import IGNORE


@dataclass
class Example:
    inputs: list[int]
    labels: list[int]


def encode_conversations(
    conversations: list[Conversation],
    template: Template,
    tokenizer: Tokenizer,
    block_size: int,
    prompt_loss: bool = False,
) -> tuple[list[Example], int]:
    """Examples of at most `block_size` inputs each, and how many had to be truncated to fit."""
    examples, truncated = [], 0
    for conversation in conversations:
        encoded = fit_to_context(encode_pieces(template.render(conversation.messages), tokenizer), block_size + 1)
        truncated += encoded.truncated
        inputs, labels = encoded.inputs_and_labels(prompt_loss)
        if isinstance(conversation, SwappedCopy):
            labels = without_new_words(labels, encoded, tokenizer, conversation.prompt_text)
        if all(label == IGNORE for label in labels):
            continue  # nothing of the answer survived truncation: nothing to learn from it
        examples.append(Example(inputs, labels))
    return examples, truncated


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels [B, longest] with padding on the right (inputs: pad_id, labels: -100)."""
    longest = max(len(e.inputs) for e in examples)
    inputs = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        inputs[row, : len(example.inputs)] = torch.tensor(example.inputs)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return inputs, labels


def steps_per_epoch(examples: int, rows_per_step: int) -> int:
    """Steps in one pass over `examples`, the last one taking what is left."""
    return -(-examples // rows_per_step)


class ExampleSteps:
    """Fine-tuning's rows for the training engine: each epoch shuffles the examples (the order of epoch e
    depends only on seed and e) and step s takes the next `rows_per_step` of them, the last step of an
    epoch what is left. Any step's examples follow from the step alone (exact resume on any world size)."""

    def __init__(self, examples: list[Example], rows_per_step: int, pad_id: int, seed: int = 0):
        if not examples:
            raise DataError("no training examples are left after filtering; check the data and block_size")
        self.examples, self.rows_per_step, self.pad_id, self.seed = examples, rows_per_step, pad_id, seed

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.examples), self.rows_per_step)

    def rows(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return order[index * self.rows_per_step : (index + 1) * self.rows_per_step]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([self.examples[i] for i in rows], self.pad_id)


def in_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order (for evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield pad_batch(examples[start : start + batch_size], pad_id)
