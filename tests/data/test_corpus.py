"""Reading text: files, folders, JSONL, JSON/CSV/parquet tables, the built-in corpus, and bad input."""

from __future__ import annotations

import json

import pytest

from kiln.data.corpus import JsonlRecords, ReadOptions, TableRecords, TextFiles, open_corpus
from kiln.errors import DataError


def read_all(corpus) -> list[str]:
    return ["".join(doc) for doc in corpus.documents()]


def test_a_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a" / "1.md").write_text("first")
    (tmp_path / "z.txt").write_text("third")
    (tmp_path / ".hidden.txt").write_text("skipped")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0")
    corpus = open_corpus(tmp_path)["all"]
    assert isinstance(corpus, TextFiles)
    assert read_all(corpus) == ["first", "second", "third"]


def test_a_large_file_streams_in_blocks_without_splitting_characters(tmp_path):
    text = "é" * 700_000 + "end"  # 1.4 MB: a 2-byte character straddles the 1 MiB block boundary
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    chunks = list(next(open_corpus(tmp_path / "big.txt")["all"].documents()))
    assert len(chunks) == 2
    assert "".join(chunks) == text


def test_one_example_per_line_makes_each_line_a_document_across_blocks(tmp_path):
    lines = [f"example {n} " + "é" * (n % 7) for n in range(150_000)]  # ~2.5 MB: lines straddle blocks
    (tmp_path / "lines.txt").write_text("\n".join(lines[:3]) + "\r\n\n  \n" + "\n".join(lines[3:]), encoding="utf-8")
    whole = open_corpus(tmp_path / "lines.txt")["all"]
    per_line = open_corpus(tmp_path / "lines.txt", options=ReadOptions(one_per_line=True))["all"]
    assert read_all(per_line) == lines  # blank lines dropped, \r\n endings stripped
    assert len(read_all(whole)) == 1
    assert per_line.fingerprint() != whole.fingerprint()  # so a prepared cache never mixes the two


def test_binary_file_is_refused_with_its_offset(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"abc\0def")
    with pytest.raises(DataError, match=r"data.bin: looks binary \(NUL byte at byte 3\).*--errors replace"):
        read_all(open_corpus(tmp_path / "data.bin")["all"])


def test_non_utf8_is_refused_with_its_byte_offset_or_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("hello é world".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8 at byte 6"):
        read_all(open_corpus(tmp_path / "latin1.txt")["all"])
    replaced = open_corpus(tmp_path / "latin1.txt", options=ReadOptions(errors="replace"))["all"]
    assert read_all(replaced) == ["hello \ufffd world"]


def test_non_utf8_offset_counts_earlier_blocks(tmp_path):
    (tmp_path / "late.txt").write_bytes(b"a" * (1 << 20) + b"bc\xff")
    with pytest.raises(DataError, match=f"not UTF-8 at byte {(1 << 20) + 2:,}"):
        read_all(open_corpus(tmp_path / "late.txt")["all"])


def test_jsonl_text_field_and_bad_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": broken}\n{"body": "four"}\n')
    corpus = open_corpus(path)["all"]
    assert isinstance(corpus, JsonlRecords)
    with pytest.raises(DataError, match=r"docs.jsonl:4: not valid JSON .*--skip-bad-lines"):
        read_all(corpus)
    skipping = open_corpus(path, options=ReadOptions(skip_bad_lines=True))["all"]
    assert read_all(skipping) == ["one", "two"]
    assert skipping.skipped_lines == 2
    body = open_corpus(path, options=ReadOptions(text_field="body", skip_bad_lines=True))["all"]
    assert read_all(body) == ["four"]


def test_jsonl_record_without_the_field_names_the_fields_found(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "x", "title": "y"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:1: no text field 'text' \(fields: content, title\)"):
        read_all(open_corpus(path)["all"])


def test_tables_through_the_datasets_library(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.csv").write_text("id,text\n1,hello there\n2,general kenobi\n")
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    pq.write_table(pa.table({"body": ["x", "y", "z"]}), tmp_path / "rows.parquet")
    assert read_all(open_corpus(tmp_path / "rows.csv")["all"]) == ["hello there", "general kenobi"]
    assert read_all(open_corpus(tmp_path / "rows.json")["all"]) == ["a", "b"]
    parquet = open_corpus(tmp_path / "rows.parquet", options=ReadOptions(text_field="body"))["all"]
    assert isinstance(parquet, TableRecords)
    assert read_all(parquet) == ["x", "y", "z"]
    with pytest.raises(DataError, match=r"rows.parquet: no column 'text' \(columns: body\)"):
        read_all(open_corpus(tmp_path / "rows.parquet")["all"])


def test_malformed_table_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"},')
    with pytest.raises(DataError, match="bad.json: cannot read it as JSON"):
        read_all(open_corpus(tmp_path / "bad.json")["all"])


def test_python_docs_is_real_english_with_no_network():
    docs = read_all(open_corpus("python-docs")["all"])
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000
    assert any('The "if" statement' in d or "if_stmt" in d for d in docs)


def test_instruction_data_set_needs_a_text_field(mirror):
    with pytest.raises(DataError, match="instruction data set"):
        open_corpus("instruction-data", mirror)
    outputs = read_all(open_corpus("instruction-data", mirror, ReadOptions(text_field="output"))["all"])
    assert len(outputs) == 1100


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_corpus(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="did you mean the-verdict"):
        open_corpus("the-verdic")
