"""Preference pairs: a prompt, the answer people chose and the one they rejected (what DPO learns from).

Any JSON or JSONL file whose records hold `prompt` or `instruction` (with an optional `input`), `chosen`
and `rejected` is read; `instruction-data-with-preference` (LLMs-from-scratch ch. 7) is one. A record that
lacks a field is a DataError naming the file, the record and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kiln.data.instructions import (
    Conversation,
    InstructionData,
    Message,
    instruction_file,
    read_records,
    record_text,
    split_records,
)
from kiln.data.registry import DATASETS
from kiln.data.templates import Template, encode_pieces, fit_to_context
from kiln.data.tokenizers import Tokenizer
from kiln.errors import DataError, TokenizerError

SPLITS = ("test", "val", "train", "all")


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # the user turn (with its input as context)
    chosen: str
    rejected: str
    source: str = ""  # "file record N" or "file:line", for messages about this pair

    def conversations(self) -> tuple[Conversation, Conversation]:
        """The prompt answered with the chosen answer, and with the rejected one."""
        chosen, rejected = (
            Conversation([*self.prompt, Message("assistant", answer)], self.source)
            for answer in (self.chosen, self.rejected)
        )
        return chosen, rejected

    @property
    def identical(self) -> bool:
        return self.chosen.strip() == self.rejected.strip()


@dataclass
class EncodedPair:
    """Each answer after the prompt as model inputs and next-token labels (-100 on the prompt)."""

    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    truncated: bool


def encode_pair(pair: PreferencePair, template: Template, tokenizer: Tokenizer, block_size: int) -> EncodedPair | None:
    """The pair as `template` writes it, each side cut to `block_size` inputs as fine-tuning cuts an
    example; None when nothing of an answer is left after the cut."""
    sides, truncated = [], False
    for conversation in pair.conversations():
        try:
            encoded = encode_pieces(template.render(conversation.messages), tokenizer)
        except TokenizerError as e:
            raise TokenizerError(f"{pair.source}: {e}") from None
        encoded = fit_to_context(encoded, block_size + 1)
        inputs, labels = encoded.inputs_and_labels()
        if all(label == -100 for label in labels):  # -100: no loss (the prompt)
            return None
        sides.append((inputs, labels))
        truncated |= encoded.truncated
    return EncodedPair(sides[0], sides[1], truncated)


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    source: str

    def unique_pairs(self) -> list[PreferencePair]:
        """The pairs without exact repeats (same prompt, chosen and rejected), first ones kept."""
        first = {}
        for pair in self.pairs:
            first.setdefault((pair.prompt, pair.chosen, pair.rejected), pair)
        return list(first.values())

    @property
    def duplicates(self) -> int:
        return len(self.pairs) - len(self.unique_pairs())

    @property
    def identical(self) -> int:
        """Pairs whose chosen answer is the rejected one: nothing to prefer, so `split` drops them."""
        return sum(pair.identical for pair in self.unique_pairs())

    def split(self, fractions: tuple[float, float, float] = (0.85, 0.10, 0.05), seed: int = 123) -> dict:
        """Train/val/test cut as instruction data is cut, then pairs with nothing to prefer dropped: a
        preference file of the same instructions in the same order (as `instruction-data-with-preference`
        is of `instruction-data`) puts every instruction in the split fine-tuning put it in."""
        splits = split_records(self.unique_pairs(), fractions, seed)
        return {name: [p for p in pairs if not p.identical] for name, pairs in splits.items()}

    def as_instructions(self) -> InstructionData:
        """Every answer, chosen and rejected, as instruction data (for the characters a vocabulary needs)."""
        conversations = [c for pair in self.pairs for c in pair.conversations()]
        return InstructionData(conversations, "preferences", self.source)


def preference_split(data: PreferenceData, split: str, seed: int = 123) -> list[PreferencePair]:
    """The pairs of `split` (test, val, train or all), split with `seed` as DPO did."""
    if split not in SPLITS:
        raise DataError(f"--split {split}: choose one of {', '.join(SPLITS)} for preference pairs")
    pairs = [p for p in data.unique_pairs() if not p.identical] if split == "all" else data.split(seed=seed)[split]
    if not pairs:
        raise DataError(
            f"{data.source}: the {split} split of {len(data.pairs):,} pairs is empty; use --split all, or more pairs"
        )
    return pairs


def is_preference_record(record: object) -> bool:
    """True for a record with `chosen` and `rejected` answers (a file whose first record is one holds pairs)."""
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def to_pair(record: object, where: str) -> PreferencePair:
    """One record as a PreferencePair."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    key = next((k for k in ("prompt", "instruction") if k in record), None)
    if key is None:
        raise DataError(
            f"{where}: the record has no 'prompt' (or 'instruction'); a preference pair needs one, "
            "with 'chosen' and 'rejected'"
        )
    prompt = Message("user", record_text(record, key, where), record_text(record, "input", where, required=False))
    chosen, rejected = record_text(record, "chosen", where), record_text(record, "rejected", where)
    return PreferencePair((prompt,), chosen, rejected, where)


def load_preferences(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> PreferenceData:
    """Read every record of a preference file (a data-set name or a path)."""
    if str(spec) in DATASETS and not Path(spec).exists() and DATASETS[str(spec)].format != "preferences":
        raise DataError(
            f"'{spec}' holds no chosen and rejected answers; preference tuning needs pairs, such as "
            "instruction-data-with-preference"
        )
    path = instruction_file(spec, data_dir)
    pairs = [to_pair(record, where) for record, where in read_records(path)]
    if not pairs:
        raise DataError(f"{path}: has no records")
    return PreferenceData(pairs, str(path))
