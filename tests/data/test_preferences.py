"""Preference pairs: prompt or instruction (+ input), chosen, rejected, from JSON or JSONL; pairs with
nothing to prefer dropped and counted; a missing field is one line naming the record and the field."""

from __future__ import annotations

import json

import pytest

from kiln.checkpoint import save_checkpoint
from kiln.cli import main
from kiln.data.instructions import load_instructions
from kiln.data.preferences import load_preferences, preference_split
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.errors import DataError
from kiln.model.gpt import GPT, GPTConfig


def write(path, records, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return path


def test_prompt_or_instruction_with_input_from_json_or_jsonl(tmp_path):
    records = [
        {"prompt": "Greet me.", "chosen": "Hello, friend!", "rejected": "What."},
        {"instruction": "Fix the spelling.", "input": "freind", "chosen": "friend", "rejected": "friend, duh"},
    ]
    for jsonl in (False, True):
        data = load_preferences(write(tmp_path / f"pairs.json{'l' * jsonl}", records, jsonl))
        first, second = data.pairs
        assert first.prompt[0].content == "Greet me." and first.prompt[0].context == ""
        assert second.prompt[0].content == "Fix the spelling." and second.prompt[0].context == "freind"
        chosen, rejected = second.conversations()
        assert chosen.response == "friend" and rejected.response == "friend, duh"
        assert chosen.prompt_messages() == rejected.prompt_messages() == list(second.prompt)
    assert data.pairs[1].source.endswith("pairs.jsonl:2")


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("chosen", "record 2: the record has no 'chosen' (or it is empty)"),
        ("rejected", "record 2: the record has no 'rejected' (or it is empty)"),
        ("instruction", "record 2: the record has no 'prompt' (or 'instruction')"),
    ],
)
def test_a_missing_field_is_one_line_naming_the_record_and_the_field(tmp_path, drop, message):
    records = [{"instruction": f"Say {w}.", "chosen": f"{w}, please.", "rejected": f"{w}!"} for w in ("a", "b", "c")]
    del records[1][drop]
    path = write(tmp_path / "pairs.json", records)
    with pytest.raises(DataError) as caught:
        load_preferences(path)
    assert str(caught.value).startswith(f"{path} {message}") and "\n" not in str(caught.value)
    records[1][drop] = ["not", "text"]
    with pytest.raises(DataError, match=f"record 2: '{drop}' should be text, not list"):
        load_preferences(write(path, records))


def test_pairs_whose_chosen_equals_rejected_are_dropped_with_a_count(tmp_path):
    records = [{"instruction": f"Say {n}.", "chosen": f"{n}, thank you.", "rejected": f"{n}!"} for n in range(40)]
    records[3]["rejected"] = records[3]["chosen"]
    records[17]["rejected"] = records[17]["chosen"] + "  "  # the same answer, but for trailing space
    data = load_preferences(write(tmp_path / "pairs.json", records))
    assert data.identical == 2
    splits = data.split()
    assert sum(len(pairs) for pairs in splits.values()) == 38
    assert not any(pair.identical for pairs in splits.values() for pair in pairs)
    assert all(not p.identical for p in preference_split(data, "all"))


def test_the_cli_says_how_many_pairs_it_dropped(tmp_path, capsys):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,!0123456789", specials=[EOS])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    base = save_checkpoint(tmp_path / "base", model, tokenizer, info={"template": "chat"})
    records = [{"prompt": f"say {n}", "chosen": f"{n}, thank you.", "rejected": f"{n}!"} for n in range(20)]
    for n in (2, 5, 11):
        records[n]["rejected"] = records[n]["chosen"]
    args = ["finetune", str(base), "--method", "dpo", "--data", str(write(tmp_path / "pairs.json", records))]
    assert main([*args, "--out", str(tmp_path / "run"), "--max-iters", "1", "--set", "threads=1"]) == 0
    printed = capsys.readouterr().out
    assert "dropped 3 pairs whose chosen answer is the rejected one (nothing to prefer)" in printed
    assert "(20 preference pairs): train 14, val 2, test 1" in printed


def test_the_registered_set_splits_as_the_instruction_set_it_extends(mirror):
    """instruction-data-with-preference holds instruction-data's 1,100 instructions in the same order, so
    DPO holds out exactly the instructions that instruction fine-tuning held out."""
    preferences = load_preferences("instruction-data-with-preference")
    assert len(preferences.pairs) == 1100 and preferences.duplicates == 0 and preferences.identical == 6
    instructions = load_instructions("instruction-data").split()
    for name, pairs in preferences.split().items():
        prompts = {(c.messages[0].content, c.messages[0].context) for c in instructions[name]}
        assert {(p.prompt[0].content, p.prompt[0].context) for p in pairs} <= prompts
    assert [len(pairs) for pairs in preferences.split().values()] == [929, 110, 55]
