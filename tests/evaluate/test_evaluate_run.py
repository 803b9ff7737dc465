"""`evaluate` end to end: instruction data gives a JSONL of scored answers, running text its val loss
(a prepared corpus's own val split when there is one), and a mistake in the input one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.cli import main
from kiln.data.corpus import open_corpus
from kiln.data.instructions import load_instructions
from kiln.data.prepare import prepare_corpus
from kiln.data.prepared import PreparedCorpus
from kiln.errors import ConfigError, DataError, KilnError
from kiln.evaluate.data import corpus_split, prepared_split
from kiln.evaluate.perplexity import corpus_metrics, token_metrics
from kiln.evaluate.run import evaluate
from kiln.model.gpt import GPT, GPTConfig
from kiln.train.run import training_data

FIELDS = {"instruction", "input", "reference", "response", "rouge_l", "exact_match", "source"}


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(n)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_instruction_file_writes_scored_answers_for_its_test_split(tmp_path, tiny_checkpoint, write_jsonl, capsys):
    data = write_jsonl(tmp_path / "sums.jsonl", alpaca_records(60))  # test split: 5% = 3 records
    checkpoint = tiny_checkpoint(tmp_path / "run" / "best", "Add and.0123456789", {"template": "alpaca"}, 256)
    result = evaluate(checkpoint, data, max_new_tokens=6)
    output = tmp_path / "run" / "eval-sums.jsonl"
    assert result["output"] == str(output) and result["split"] == "test" and result["kind"] == "instructions"
    rows = read_jsonl(output)
    expected = load_instructions(data).split(seed=123)["test"]
    assert [row["reference"] for row in rows] == [c.response for c in expected]
    assert [row["source"] for row in rows] == [c.source for c in expected]
    for row in rows:
        assert set(row) == FIELDS
        assert 0.0 <= row["rouge_l"] <= 1.0 and isinstance(row["exact_match"], bool)
    assert result["examples"] == 3
    assert result["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / 3)
    assert result["answer_loss"] == pytest.approx(math.log(load_checkpoint(checkpoint).tokenizer.vocab_size), abs=0.1)
    shown = capsys.readouterr().out
    assert "ROUGE-L" in shown and "exact match" in shown and str(output) in shown

    again = evaluate(checkpoint, data, max_new_tokens=6, out=tmp_path / "again.jsonl", show=False)
    assert read_jsonl(tmp_path / "again.jsonl") == rows  # greedy: the same answers every time
    assert again["rouge_l"] == result["rouge_l"]


def test_the_split_seed_a_model_was_finetuned_with_is_used(tmp_path, tiny_checkpoint, write_jsonl):
    data = write_jsonl(tmp_path / "sums.jsonl", alpaca_records(60))
    info = {"template": "alpaca", "finetune": {"data": str(data), "split_seed": 7}}
    checkpoint = tiny_checkpoint(tmp_path / "best", "Add and.0123456789", info, 256)
    result = evaluate(checkpoint, max_new_tokens=2, split="val", limit=4, show=False)  # data from the checkpoint
    rows = read_jsonl(tmp_path / "eval-sums-val.jsonl")
    assert result["examples"] == len(rows) == 4
    assert [row["source"] for row in rows] == [c.source for c in load_instructions(data).split(seed=7)["val"][:4]]


def test_a_learned_model_scores_full_marks_on_chat_records(tmp_path, learned_checkpoint, learned_answers, write_jsonl):
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in learned_answers]
    records = [{"messages": messages} for messages in turns]
    data = write_jsonl(tmp_path / "learned.jsonl", records)
    result = evaluate(learned_checkpoint, data, split="all", max_new_tokens=20, out=tmp_path / "out.jsonl", show=False)
    assert (result["examples"], result["rouge_l"], result["exact_match"]) == (4, 1.0, 1.0)
    assert [row["response"] for row in read_jsonl(tmp_path / "out.jsonl")] == [a for _, a in learned_answers]


def test_instruction_data_set_by_name(tmp_path, tiny_checkpoint, mirror):
    text = (mirror / "instruction-data.json").read_text(encoding="utf-8")
    checkpoint = tiny_checkpoint(tmp_path / "best", text, {"template": "alpaca"}, 128)
    result = evaluate(checkpoint, "instruction-data", limit=2, max_new_tokens=3, show=False)
    assert result["examples"] == 2 and result["split"] == "test"
    expected = load_instructions("instruction-data").split()["test"][:2]  # 55 test records, first two
    assert [row["reference"] for row in read_jsonl(tmp_path / "eval-instruction-data.jsonl")] == [
        c.response for c in expected
    ]


def test_running_text_is_scored_on_its_last_tenth(tmp_path, tiny_checkpoint, verdict_text):
    checkpoint = tiny_checkpoint(tmp_path / "best", verdict_text)
    result = evaluate(checkpoint, "the-verdict", show=False)
    val = verdict_text[int(len(verdict_text) * 0.9) :]  # what kiln prepare keeps for val
    ckpt = load_checkpoint(checkpoint)
    expected = corpus_metrics(ckpt.model, ckpt.tokenizer, val)
    assert result["kind"] == "corpus" and result["split"] == "val"
    assert (result["tokens"], result["bytes"]) == (len(val), len(val.encode("utf-8")))
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    (row,) = read_jsonl(tmp_path / "eval-the-verdict.jsonl")
    assert row["loss"] == pytest.approx(result["loss"]) and row["data"] == "the-verdict"


def test_prepared_text_is_scored_on_its_own_val_split(tmp_path, verdict_text):
    prepared_dir = tmp_path / "verdict-char"
    assert (
        main(["prepare", "the-verdict", "--tokenizer", "char", "--val-fraction", "0.05", "--out", str(prepared_dir)])
        == 0
    )
    prepared = PreparedCorpus.open(prepared_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=prepared.tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    # what `kiln train --data DIR` records: the prepared folder it trained on
    checkpoint = save_checkpoint(tmp_path / "run" / "best", model, prepared.tokenizer, info={"data": str(prepared_dir)})
    val = prepared.tokens("val")
    cut = int(len(verdict_text) * 0.95)
    assert prepared.tokenizer.decode(val.tolist()) == verdict_text[cut:]
    expected = token_metrics(model, prepared.tokenizer, val)
    for data in (prepared_dir, "the-verdict"):  # the folder, or the text the checkpoint was trained on
        result = evaluate(checkpoint, data, show=False)
        assert result["prepared"] == str(prepared_dir)
        # val opens inside the story, so its first token is only context: every scored token is a val
        # token, none a training one (a fresh 10% cut would score twice as many)
        assert result["tokens"] == len(val) - 1 == len(verdict_text) - cut - 1
        assert result["bytes"] == len(verdict_text[cut + 1 :].encode("utf-8"))
        assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    limited = evaluate(checkpoint, prepared_dir, limit=100, show=False)
    assert limited["tokens"] == 99 and limited["bytes"] == len(verdict_text[cut + 1 : cut + 100].encode("utf-8"))
    train = evaluate(checkpoint, prepared_dir, split="train", limit=100, show=False)
    # one story, so no EOS in the vocabulary to stand for its start: the first token is only context
    assert (train["tokens"], train["bytes"]) == (99, len(verdict_text[1:100].encode("utf-8")))


def test_text_prepared_by_training_is_found_in_the_cache_or_cut_at_its_fraction(
    tmp_path, verdict_text, mirror, tiny_checkpoint
):
    cached = training_data("the-verdict", "char", mirror)  # what `kiln train --data the-verdict` prepares
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=cached.tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    grown = cached.tokenizer.with_added(chars="#", specials=["<|user|>"])  # as fine-tuning grows it
    model.resize_vocab(grown.vocab_size)
    result = evaluate(save_checkpoint(tmp_path / "tuned", model, grown), "the-verdict", show=False)
    assert result["prepared"] == str(cached.folder) and result["tokens"] == len(cached.tokens("val")) - 1

    prepared_dir = tmp_path / "verdict-5"
    assert (
        main(["prepare", "the-verdict", "--tokenizer", "char", "--val-fraction", "0.05", "--out", str(prepared_dir)])
        == 0
    )
    # another tokenizer than the folder's: the text is cut where that folder was cut, and read again
    other = tiny_checkpoint(tmp_path / "other", verdict_text, {"data": str(prepared_dir)})
    result = evaluate(other, "the-verdict", show=False)
    assert "prepared" not in result and result["tokens"] == len(verdict_text) - int(len(verdict_text) * 0.95)
    with pytest.raises(DataError, match="verdict-5: was prepared with a char tokenizer of .* does not read"):
        evaluate(other, prepared_dir, show=False)


def test_a_data_set_with_its_own_val_file_uses_it(mirror):
    valid = (mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    assert corpus_split("wikitext-2", "val", limit_chars=5000) == [valid[:5000]]
    train = (mirror / "wikitext-2" / "train.txt").read_text(encoding="utf-8")
    assert corpus_split("wikitext-2", "train", limit_chars=300) == [train[:300]]


def test_a_split_crosses_documents_as_prepare_cuts_them(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 85)
    (folder / "b.txt").write_text("b" * 15)  # 100 characters: val is the last 10, all in b.txt
    (folder / "c.txt").write_text("")
    assert corpus_split(folder, "val") == ["b" * 10]
    (folder / "b.txt").write_text("b" * 5)  # 90 characters: val starts inside a.txt
    assert corpus_split(folder, "val") == ["a" * 4, "b" * 5]
    assert corpus_split(folder, "train") == ["a" * 81]
    assert corpus_split(folder, "all", limit_chars=87) == ["a" * 85, "b" * 2]


def test_a_prepared_split_opens_after_an_eos_where_it_opens_a_document(tmp_path):
    (tmp_path / "docs").mkdir()
    for name, text in [("1.txt", "First story."), ("2.txt", "Second story."), ("3.txt", "Third.")]:
        (tmp_path / "docs" / name).write_text(text)
    # 31 characters cut at 25, between the second and third stories
    prepared = prepare_corpus(open_corpus(tmp_path / "docs"), "char", tmp_path / "out", val_fraction=0.19)
    decode = prepared.tokenizer.decode
    eos = "<|endoftext|>"
    assert decode(prepared_split(prepared, "val").tolist()) == eos + "Third."
    assert decode(prepared_split(prepared, "train").tolist()) == f"{eos}First story.{eos}Second story.{eos}"
    assert decode(prepared_split(prepared, "all").tolist()) == f"{eos}First story.{eos}Second story.{eos}Third."
    assert decode(prepared_split(prepared, "all", limit_chars=15).tolist()) == f"{eos}First story.{eos}Sec"


def test_text_and_jsonl_files_are_running_text(tmp_path, tiny_checkpoint, write_jsonl):
    checkpoint = tiny_checkpoint(tmp_path / "best", "hello world")
    (tmp_path / "hello.txt").write_text("hello world " * 10)
    result = evaluate(checkpoint, tmp_path / "hello.txt", split="all", limit=50, show=False)
    assert (result["kind"], result["tokens"], result["bytes"]) == ("corpus", 50, 50)
    assert (tmp_path / "eval-hello-all.jsonl").is_file()
    records = write_jsonl(tmp_path / "notes.jsonl", [{"text": "hello"}, {"text": "world"}])
    result = evaluate(checkpoint, records, split="all", show=False)
    assert (result["kind"], result["tokens"], result["bytes"]) == ("corpus", 11, 10)  # EOS between the two


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ("tinyshakespear", DataError, "did you mean tinyshakespeare"),
        ("missing.txt", DataError, "no such file"),
        ("empty.jsonl", DataError, "empty.jsonl: is empty"),
        ("empty.txt", DataError, "empty"),
        ("odd.jsonl", DataError, "match no instruction format.*--text-field"),
        ("three.jsonl", DataError, "test split of 3 records is empty; use --split all"),
    ],
)
def test_bad_data_is_one_clear_error(tmp_path, monkeypatch, tiny_checkpoint, write_jsonl, data, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "completion": "b"}])
    write_jsonl(tmp_path / "three.jsonl", alpaca_records(3))
    checkpoint = tiny_checkpoint(tmp_path / "best", "Add and.0123456789")
    with pytest.raises(error, match=message):
        evaluate(checkpoint, data, show=False)


def test_bad_settings_are_one_clear_error(tmp_path, tiny_checkpoint, write_jsonl):
    checkpoint = tiny_checkpoint(tmp_path / "best", "Add and.0123456789")
    data = write_jsonl(tmp_path / "sums.jsonl", alpaca_records(60))
    with pytest.raises(ConfigError, match="--limit 0"):
        evaluate(checkpoint, data, limit=0, show=False)
    with pytest.raises(ConfigError, match="--split dev"):
        evaluate(checkpoint, data, split="dev", show=False)
    with pytest.raises(ConfigError, match="name the data to evaluate on with --data"):
        evaluate(checkpoint, show=False)
    with pytest.raises(KilnError, match="not a Kiln checkpoint"):
        evaluate(tmp_path, data, show=False)
