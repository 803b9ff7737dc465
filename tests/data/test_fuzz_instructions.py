"""Fuzzing the instruction readers: every well-formed file reads back exactly, and every malformed one
(missing fields, wrong types, nulls, nested junk, bytes that are not UTF-8, truncation, empty files) is a
one-line DataError naming the file, never another exception."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.data.instructions import FORMAT_NAMES, ROLES, InstructionData, Message, load_instructions
from kiln.errors import DataError

# Characters that str.splitlines() takes for line ends (JSON writes the last few raw) and a BOM.
LINE_LIKE = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\r\n", "\ufeff"]
text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(LINE_LIKE)), max_size=5).map("".join)
filled = text.filter(str.strip)  # what a required field must hold
FIELDS = ["instruction", "input", "output", "context", "response", "category", "question", "answer", "messages"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def turns(draw) -> list[dict]:
    """A valid chat: an optional system message, then turns ending with a non-empty assistant answer."""
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), max_size=4)) + ["user", "assistant"]
    if draw(st.booleans()):
        roles = ["system", *roles]
    messages = [{"role": role, "content": draw(text)} for role in roles]
    messages[-1]["content"] = draw(filled)
    return messages


def valid_record(fmt: str) -> st.SearchStrategy[dict]:
    return {
        "alpaca": st.fixed_dictionaries({"instruction": filled, "input": text, "output": filled}),
        "dolly": st.fixed_dictionaries(
            {"instruction": filled, "context": text, "response": filled, "category": st.just("open_qa")}
        ),
        "qa": st.fixed_dictionaries({"question": filled, "answer": filled}),
        "chat": st.fixed_dictionaries({"messages": turns()}),
    }[fmt]


def expected_messages(fmt: str, record: dict) -> list[Message]:
    if fmt == "chat":
        return [Message(m["role"], m["content"]) for m in record["messages"]]
    prompt, answer, context = {
        "alpaca": ("instruction", "output", "input"),
        "dolly": ("instruction", "response", "context"),
        "qa": ("question", "answer", None),
    }[fmt]
    return [Message("user", record[prompt], record.get(context, "")), Message("assistant", record[answer])]


def file_bytes(records: list, layout: str, ascii_only: bool, crlf: bool, bom: bool) -> bytes:
    if layout == "json":
        body = json.dumps(records, ensure_ascii=ascii_only, indent=1)
    else:
        body = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
    if crlf:
        body = body.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8", "surrogatepass")


@settings(max_examples=100)
@given(
    fmt=st.sampled_from(["alpaca", "dolly", "qa", "chat"]),
    data=st.data(),
    layout=st.sampled_from(["json", "jsonl"]),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    bom=st.booleans(),
)
def test_well_formed_files_read_back_exactly(tmp_path_factory, fmt, data, layout, ascii_only, crlf, bom):
    records = data.draw(st.lists(valid_record(fmt), min_size=1, max_size=4))
    path = tmp_path_factory.mktemp("ok") / f"data.{layout}"
    path.write_bytes(file_bytes(records, layout, ascii_only, crlf, bom))
    read = load_instructions(path, format=data.draw(st.sampled_from([None, fmt])))
    assert read.format == fmt
    assert [c.messages for c in read.conversations] == [expected_messages(fmt, r) for r in records]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_line_separators_inside_a_jsonl_string_stay_in_the_string(tmp_path, char):
    """Found by the fuzzer: JSON writes these raw, and str.splitlines() had cut the record in two."""
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": f"a{char}b", "answer": "c"}, ensure_ascii=False) + "\n")
    assert load_instructions(path).conversations[0].messages[0].content == f"a{char}b"


@st.composite
def malformed_record(draw) -> object:
    """A valid record with fields dropped, replaced by junk (nulls, numbers, nested lists and objects,
    lone surrogates) or added; or junk in place of the whole record."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    record = draw(valid_record(draw(st.sampled_from(["alpaca", "dolly", "qa", "chat"]))))
    junk = json_values | st.just("\ud800") | st.just("") | st.just(" ")
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(record) + FIELDS))
        action = draw(st.sampled_from(["drop", "junk", "nested"]))
        if action == "drop":
            record.pop(key, None)
        elif action == "junk":
            record[key] = draw(junk)
        elif isinstance(record.get("messages"), list) and record["messages"]:
            turn = draw(st.sampled_from(record["messages"]))
            if isinstance(turn, dict):
                turn[draw(st.sampled_from(["role", "content"]))] = draw(junk | st.sampled_from(ROLES))
    return record


def damaged(raw: bytes, how: str, at: int, byte: int) -> bytes:
    at = at % (len(raw) + 1)
    if how == "truncate":
        return raw[:at]
    if how == "byte":  # a byte that UTF-8 does not allow there
        return raw[:at] + bytes([byte]) + raw[at:]
    if how == "blank lines":
        return b"\n\n" + raw.replace(b"\n", b"\n \n")
    return raw


ONE_LINE_ERROR = re.compile(r"[^\n]+")


@settings(max_examples=400)
@given(
    records=st.lists(malformed_record(), min_size=1, max_size=4),
    layout=st.sampled_from(["json", "jsonl"]),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    bom=st.booleans(),
    how=st.sampled_from(["as written", "as written", "as written", "truncate", "byte", "blank lines"]),
    at=st.integers(0, 10_000),
    byte=st.integers(0x80, 0xFF),
    fmt=st.sampled_from([None, *FORMAT_NAMES]),
)
@example(
    records=[], layout="jsonl", ascii_only=True, crlf=False, bom=False, how="as written", at=0, byte=0x80, fmt=None
)
@example(  # a byte that is not UTF-8: was a UnicodeDecodeError
    records=[{"question": "q", "answer": "a"}],
    layout="jsonl",
    ascii_only=True,
    crlf=False,
    bom=False,
    how="byte",
    at=3,
    byte=0xFF,
    fmt=None,
)
@example(  # a lone surrogate escape: was read as text that no tokenizer can encode
    records=[{"question": "\ud800", "answer": "a"}],
    layout="json",
    ascii_only=True,
    crlf=False,
    bom=False,
    how="as written",
    at=0,
    byte=0x80,
    fmt=None,
)
def test_malformed_files_are_one_clear_data_error(
    tmp_path_factory, records, layout, ascii_only, crlf, bom, how, at, byte, fmt
):
    path = tmp_path_factory.mktemp("bad") / f"data.{layout}"
    path.write_bytes(damaged(file_bytes(records, layout, ascii_only, crlf, bom), how, at, byte))
    try:
        read = load_instructions(path, format=fmt)
    except DataError as e:
        assert str(path) in str(e)
        assert ONE_LINE_ERROR.fullmatch(str(e))
        return
    assert isinstance(read, InstructionData) and read.conversations
    for conversation in read.conversations:
        assert conversation.messages[-1].role == "assistant" and conversation.response.strip()
        for message in conversation.messages:
            assert message.role in ROLES
            assert isinstance(message.content, str) and isinstance(message.context, str)
            (message.content + message.context).encode("utf-8")  # text every tokenizer can take


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("1" * 5000, "data.json:1"),  # an integer past Python's 4,300-digit limit: was a bare ValueError
        ("[" * 100_000, "data.json"),  # nesting past the recursion limit: was a RecursionError
        ('{"question": "q", "answer": ' + "[" * 100_000, "data.json:1"),
    ],
)
def test_json_that_python_cannot_hold_is_a_data_error(tmp_path, content, where):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(where)):
        load_instructions(path)


def test_a_byte_that_is_not_utf8_is_named_by_its_place_in_the_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"\xef\xbb\xbfPAR1\xff")  # the BOM counts: byte 7 of the file
    with pytest.raises(DataError, match=r"data.parquet: not UTF-8 at byte 7; .* parquet table to JSONL"):
        load_instructions(path)
