"""Instruction formats: each parses into conversations; a malformed record is one clear error."""

from __future__ import annotations

import json

import pytest

from kiln.data.instructions import Message, load_instructions
from kiln.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


FORMAT_CASES = {
    "alpaca": (
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Echo", "input": "hi", "output": "hi"},
        ],
        [Message("user", "Add 2 and 3."), Message("assistant", "5")],
        "hi",
    ),
    "dolly": (
        [
            {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "closed_qa"},
            {"instruction": "Name a colour", "context": "", "response": "Red", "category": "brainstorming"},
        ],
        [Message("user", "Who?", "Ada wrote it."), Message("assistant", "Ada")],
        "",
    ),
    "qa": (
        [{"question": "Capital of France?", "answer": "Paris"}, {"question": "2+2?", "answer": "4"}],
        [Message("user", "Capital of France?"), Message("assistant", "Paris")],
        "",
    ),
    "chat": (
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]},
        ],
        [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello.")],
        "",
    ),
}


@pytest.mark.parametrize("name", FORMAT_CASES)
def test_each_format_is_detected_and_parsed(tmp_path, name):
    records, first, second_context = FORMAT_CASES[name]
    data = load_instructions(write_jsonl(tmp_path / "data.jsonl", records))
    assert data.format == name
    assert data.conversations[0].messages == first
    assert data.conversations[0].response == first[-1].content
    assert data.conversations[1].messages[0].context == second_context


def test_qa_also_reads_instruction_response(tmp_path):
    data = load_instructions(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say yes", "response": "yes"}]))
    assert data.format == "qa"
    assert data.conversations[0].messages == [Message("user", "Say yes"), Message("assistant", "yes")]


def test_alpaca_json_array_from_the_mirror(mirror):
    data = load_instructions("instruction-data", mirror)
    assert (data.format, len(data.conversations)) == ("alpaca", 1100)
    splits = data.split()
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "val": 110, "test": 55}
    # the split is a function of the seed alone, and loses nothing
    assert [c.source for c in data.split()["test"]] == [c.source for c in splits["test"]]
    assert [c.source for c in data.split(seed=1)["test"]] != [c.source for c in splits["test"]]
    assert sorted(c.source for part in splits.values() for c in part) == sorted(c.source for c in data.conversations)


@pytest.mark.parametrize(
    ("name", "bad", "says"),
    [
        ("alpaca", '{"instruction": "x", "output": 5}', "'output' should be text"),
        ("alpaca", '{"instruction": "x", "output": ""}', "no 'output'"),
        ("dolly", '{"instruction": "x", "context": "", "category": "qa"}', "lack ['response']"),
        ("qa", '{"question": "x", "answer": "y"', "not valid JSON"),
        ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "last message should be the assistant"),
        ("chat", '{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, name, bad, says):
    good = FORMAT_CASES[name][0][0]
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError) as error:
        load_instructions(path)
    message = str(error.value)
    assert f"{path}:2" in message and says in message and "\n" not in message


def test_unknown_fields_name_the_fields_found_and_the_formats_accepted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"\['completion', 'prompt'\] match no instruction format.*alpaca"):
        load_instructions(path)


def test_a_named_format_must_fit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="--format alpaca needs"):
        load_instructions(path, format="alpaca")


def test_running_text_is_not_instruction_data(mirror):
    with pytest.raises(DataError, match="running text"):
        load_instructions("tinyshakespeare", mirror)


def test_exact_duplicates_are_dropped_before_the_split_so_none_is_both_trained_and_held_out(tmp_path):
    import json

    from kiln.data.instructions import load_instructions

    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(records + records[:15]))
    data = load_instructions(str(path))
    assert data.duplicates == 15
    splits = data.split()
    texts = {name: [c.messages[0].content for c in part] for name, part in splits.items()}
    assert sum(len(t) for t in texts.values()) == 40
    assert not set(texts["train"]) & (set(texts["val"]) | set(texts["test"]))
