"""Instruction data: Alpaca, Dolly, question/answer and chat-messages records, read into one shape.

Every record becomes a `Conversation`: a list of `Message`s (system, user, assistant turns) ending with
the assistant's answer. A user turn may carry a `context` (Alpaca's `input`, Dolly's `context`), which the
Alpaca template shows under its own heading. Formats are told apart by their fields; a record that does
not fit is a DataError naming the file and line.
"""

from __future__ import annotations

import codecs
import json
import os
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.data.fetch import resolve_dataset
from kiln.data.registry import DATASETS, get_dataset
from kiln.data.tokenizers.base import UnknownCharacter, refuse_surrogates
from kiln.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    context: str = ""  # extra input shown with a user turn


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # "file:line", for messages about this record

    @property
    def response(self) -> str:
        """The final assistant turn: what the model learns to write, and the reference it is scored on."""
        return self.messages[-1].content

    def prompt_messages(self) -> list[Message]:
        return self.messages[:-1]

    @property
    def prompt_text(self) -> str:
        """Every prompt turn's words and input, joined by spaces: what "the question" says."""
        return " ".join(f"{m.content} {m.context}" for m in self.prompt_messages())


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    # A format is chosen when a record has all of `required` and any of `marks` (or no marks given).
    marks: tuple[str, ...] = ()
    description: str = ""


FORMATS = {
    f.name: f
    for f in (
        Format("chat", ("messages",), description="messages: [{role, content}, ...]"),
        Format("alpaca", ("instruction", "output"), ("input",), description="instruction, input, output"),
        Format(
            "dolly",
            ("instruction", "response"),
            ("context", "category"),
            marks=("context", "category"),
            description="instruction, context, response, category",
        ),
        Format("qa", ("question", "answer"), description="question, answer"),
        Format("qa-instruction", ("instruction", "response"), description="instruction, response"),
    )
}
FORMAT_NAMES = ("alpaca", "dolly", "qa", "chat")  # what --format accepts; qa covers both of its spellings


def detect_format(record: dict, where: str) -> Format:
    """The format a record's fields say it is in."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    for fmt in FORMATS.values():
        if all(k in record for k in fmt.required) and (not fmt.marks or any(k in record for k in fmt.marks)):
            return fmt
    accepted = "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values() if f.name != "qa-instruction")
    accepted += "; qa may also be instruction, response"
    raise DataError(f"{where}: fields {sorted(record)} match no instruction format; accepted formats: {accepted}")


def record_text(record: dict, key: str, where: str, required: bool = True) -> str:
    """The text field `key` of a record, or a DataError naming the record and the field."""
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise DataError(f"{where}: the record has no '{key}' (or it is empty); every record needs one")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' should be text, not {type(value).__name__}")
    return _readable(value, where, f"'{key}'")


def _readable(text: str, where: str, field: str) -> str:
    """`text`, or a DataError for a lone surrogate (a JSON "\\ud800" escape alone), which no tokenizer reads."""
    try:
        return refuse_surrogates(text)
    except UnknownCharacter as e:
        raise DataError(f"{where}: {field} holds {e}") from None


def to_conversation(record: dict, fmt: Format, where: str) -> Conversation:
    """One record in format `fmt` as a Conversation."""
    if fmt.name == "chat":
        return _chat_conversation(record, where)
    if fmt.name == "qa":
        prompt, context, response = record_text(record, "question", where), "", record_text(record, "answer", where)
    elif fmt.name == "alpaca":
        prompt, response = record_text(record, "instruction", where), record_text(record, "output", where)
        context = record_text(record, "input", where, required=False)
    else:  # dolly, qa-instruction
        prompt, response = record_text(record, "instruction", where), record_text(record, "response", where)
        context = record_text(record, "context", where, required=False)
    return Conversation([Message("user", prompt, context), Message("assistant", response)], where)


def _chat_conversation(record: dict, where: str) -> Conversation:
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'messages' should be a non-empty list of {{role, content}} objects")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: message {number} needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            role = reprlib.repr(turn["role"])  # a role of nested junk stays short
            raise DataError(f"{where}: message {number} has role {role}; use one of {', '.join(ROLES)}")
        if turn["role"] == "system" and number != 1:
            raise DataError(f"{where}: message {number} is a system message; only the first may be one")
        if not isinstance(turn["content"], str):
            raise DataError(f"{where}: message {number}'s content should be text")
        messages.append(Message(turn["role"], _readable(turn["content"], where, f"message {number}'s content")))
    if messages[-1].role != "assistant" or not messages[-1].content.strip():
        raise DataError(f"{where}: the last message should be the assistant's (non-empty) response")
    if not any(m.role == "user" for m in messages):
        raise DataError(f"{where}: the conversation has no user message")
    return Conversation(messages, where)


@dataclass
class InstructionData:
    conversations: list[Conversation]
    format: str
    source: str
    skipped: int = 0
    details: dict = field(default_factory=dict)

    def unique_conversations(self) -> list[Conversation]:
        """The conversations without exact repeats (same roles, texts and contexts), first ones kept."""
        seen, unique = set(), []
        for conversation in self.conversations:
            key = tuple((m.role, m.content, m.context) for m in conversation.messages)
            if key not in seen:
                seen.add(key)
                unique.append(conversation)
        return unique

    @property
    def duplicates(self) -> int:
        return len(self.conversations) - len(self.unique_conversations())

    def split(self, fractions: tuple[float, float, float] = (0.85, 0.10, 0.05), seed: int = 123) -> dict:
        """Shuffle by `seed` and cut into train/val/test (LLMs-from-scratch ch. 7 uses 85/10/5).

        Val and test take their rounded-down share; train takes the rest, so no example is lost. Exact
        duplicates are dropped first, so that no held-out example is also a training one.
        """
        return split_records(self.unique_conversations(), fractions, seed)


def split_records(records: list, fractions: tuple[float, float, float] = (0.85, 0.10, 0.05), seed: int = 123) -> dict:
    """`records` shuffled by `seed` and cut into train/val/test: val and test take their rounded-down
    share, train the rest. Two files of the same number of records are cut at the same places."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions} should be three non-negative numbers adding up to 1")
    order = np.random.default_rng(seed).permutation(len(records))
    n = len(order)
    n_val, n_test = int(n * fractions[1]), int(n * fractions[2])
    n_train = n - n_val - n_test
    pick = [records[i] for i in order]
    return {"train": pick[:n_train], "val": pick[n_train : n_train + n_val], "test": pick[n_train + n_val :]}


def read_records(path: Path) -> Iterator[tuple[object, str]]:
    """(record, 'file:line') for a JSON array file or a JSONL file (UTF-8, a BOM dropped)."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 at byte {bom + e.start:,}; instruction records are UTF-8 JSON or JSONL, so convert "
            "it to UTF-8 (or a CSV or parquet table to JSONL)"
        ) from None
    if text.lstrip().startswith("["):
        for number, record in enumerate(_parse_json(text, str(path), line=False), 1):
            yield record, f"{path} record {number}"
        return
    # Only "\n" ends a line: JSON strings may hold U+2028, U+0085 and the like raw, which splitlines() cuts at.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            where = f"{path}:{number}"
            yield _parse_json(line, where, line=True), where


def _parse_json(text: str, where: str, line: bool) -> object:
    """One JSON value; with `line`, `text` is the JSONL line that `where` names."""
    advice = "; each line should be one JSON object" if line else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = "" if line else f":{e.lineno}"
        raise DataError(f"{where}{at}: not valid JSON ({e.msg}){advice}") from None
    except (ValueError, RecursionError) as e:  # an integer past 4,300 digits; nesting past the stack
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise DataError(f"{where}: cannot read this JSON ({why}){advice}") from None


def instruction_file(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """A local file for a data-set name (through the mirror, cache or a download) or a path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if str(spec) in DATASETS:
        dataset = get_dataset(str(spec))
        if dataset.format not in ("instructions", "preferences"):  # preference records are instructions too
            raise DataError(f"'{dataset.name}' is running text, not instruction records; pretrain on it instead")
        return resolve_dataset(dataset, data_dir)["text"]
    if path.exists():
        raise DataError(f"{path}: is a folder; give one .json or .jsonl file of instruction records")
    get_dataset(str(spec))  # raises with close names
    raise AssertionError("unreachable")


def load_instructions(
    spec: str | os.PathLike, data_dir: str | os.PathLike | None = None, format: str | None = None
) -> InstructionData:
    """Read every record of an instruction file (format detected from the first record unless named)."""
    if format is not None and format not in FORMAT_NAMES:
        raise DataError(f"--format {format}: choose one of {', '.join(FORMAT_NAMES)}")
    path = instruction_file(spec, data_dir)
    conversations, chosen = [], None
    for record, where in read_records(path):
        if chosen is None:
            chosen = detect_format(record, where)
            if format is not None and not chosen.name.startswith(format):
                chosen = _named_format(format, record, where)
        elif not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
        elif missing := [k for k in chosen.required if k not in record]:
            raise DataError(
                f"{where}: fields {sorted(record)} lack {missing}, which the {chosen.name} format "
                "(set by the first record) needs"
            )
        conversations.append(to_conversation(record, chosen, where))
    if not conversations:
        raise DataError(f"{path}: has no records")
    return InstructionData(conversations, chosen.name.split("-")[0], str(path))


def _named_format(name: str, record: dict, where: str) -> Format:
    candidates = [f for f in FORMATS.values() if f.name.split("-")[0] == name]
    for fmt in candidates:
        if all(k in record for k in fmt.required):
            return fmt
    needed = " or ".join(str(list(f.required)) for f in candidates)
    raise DataError(f"{where}: --format {name} needs the fields {needed}; this record has {sorted(record)}")
