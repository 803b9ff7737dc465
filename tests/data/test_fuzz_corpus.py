"""Fuzzing the record readers of pretraining text (JSONL, JSON, CSV, parquet with --text-field): a
malformed file gives its documents or a one-line DataError naming the file, never another exception."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.data.corpus import ReadOptions, open_corpus
from kiln.errors import DataError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
records = st.lists(
    st.one_of(st.dictionaries(st.sampled_from(["text", "body", "id"]), json_values, max_size=3), json_values),
    min_size=1,
    max_size=5,
)
cells = st.none() | st.text(max_size=8) | st.integers()
ONE_LINE = re.compile(r"[^\n]+")


def read(path, options: ReadOptions) -> list[str]:
    (corpus,) = open_corpus(path, options=options).values()
    return ["".join(document) for document in corpus.documents()]


def damaged(raw: bytes, how: str, at: int, byte: int) -> bytes:
    at %= len(raw) + 1
    return {"truncate": raw[:at], "byte": raw[:at] + bytes([byte]) + raw[at:]}.get(how, raw)


def assert_read_or_refused(path, options: ReadOptions) -> None:
    try:
        documents = read(path, options)
    except DataError as e:
        assert str(path) in str(e) and ONE_LINE.fullmatch(str(e)), str(e)
        return
    assert all(isinstance(d, str) for d in documents)


@settings(max_examples=200)
@given(
    lines=records,
    how=st.sampled_from(["as written", "truncate", "byte"]),
    at=st.integers(0, 1000),
    byte=st.integers(0x80, 0xFF),
    skip_bad_lines=st.booleans(),
    errors=st.sampled_from(["strict", "replace"]),
    text_field=st.sampled_from([None, "body"]),
)
@example(lines=[{"text": "ok"}], how="byte", at=10, byte=0xFF, skip_bad_lines=False, errors="strict", text_field=None)
@example(lines=[{"\n": None}], how="as written", at=0, byte=128, skip_bad_lines=False, errors="strict", text_field=None)
def test_jsonl_records_are_read_or_refused(tmp_path_factory, lines, how, at, byte, skip_bad_lines, errors, text_field):
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    raw = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    path.write_bytes(damaged(raw, how, at, byte))
    assert_read_or_refused(path, ReadOptions(errors=errors, skip_bad_lines=skip_bad_lines, text_field=text_field))


def test_jsonl_past_python_limits_is_a_data_error(tmp_path):
    """These were a bare UnicodeDecodeError, ValueError (4,300 digits) and RecursionError."""
    path = tmp_path / "docs.jsonl"
    for raw, problem, good in [
        (b'{"text": "ok"}\n{"text": "\xff"}\n', "docs.jsonl:2: not UTF-8 at byte 10", ["ok"]),
        (b'{"text": ' + b"1" * 5000 + b"}\n", "docs.jsonl:1: Exceeds the limit", []),
        (b"[" * 100_000 + b"\n", "docs.jsonl:1: nested too deeply", []),
    ]:
        path.write_bytes(raw)
        try:
            read(path, ReadOptions())
        except DataError as e:
            assert problem in str(e)
        else:
            raise AssertionError(f"{raw[:20]!r} was read")
        assert read(path, ReadOptions(skip_bad_lines=True)) == good


@settings(max_examples=25)  # each read goes through the `datasets` library: slower
@given(
    suffix=st.sampled_from([".json", ".csv", ".parquet"]),
    rows=st.lists(st.dictionaries(st.sampled_from(["text", "body"]), cells, min_size=1), min_size=1, max_size=4),
    how=st.sampled_from(["as written", "truncate", "byte"]),
    at=st.integers(0, 400),
    byte=st.integers(0x80, 0xFF),
)
def test_tables_are_read_or_refused(tmp_path_factory, suffix, rows, how, at, byte):
    path = tmp_path_factory.mktemp("table") / f"docs{suffix}"
    if suffix == ".parquet":
        columns = {key: [str(row.get(key)) for row in rows] for key in {k for row in rows for k in row}}
        pq.write_table(pa.table(columns), path)
        raw = path.read_bytes()
    elif suffix == ".csv":
        keys = sorted({k for row in rows for k in row})
        lines = [",".join(keys)] + [",".join(json.dumps(str(row.get(k, ""))) for k in keys) for row in rows]
        raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    else:
        raw = json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass")
    path.write_bytes(damaged(raw, how, at, byte))
    assert_read_or_refused(path, ReadOptions())
