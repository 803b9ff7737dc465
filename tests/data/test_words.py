"""The words a model has read: counted from the train split as text is prepared, saved beside the tokenizer
as words.txt, and carried wherever the tokenizer goes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import kiln.data.words as words_module
from kiln.data.corpus import open_corpus
from kiln.data.prepare import prepare_corpus
from kiln.data.tokenizers import EOS, CharTokenizer, load_tokenizer
from kiln.data.words import WORDS_FILE, WordCounter, load_words, save_words, words_of
from kiln.errors import TokenizerError


def test_a_word_is_a_run_of_letters_case_folded():
    assert words_of("Don't stop, NAÏVE reader: 42nd") == ["don", "t", "stop", "na", "ve", "reader", "nd"]


def test_counts_are_saved_commonest_first_and_read_back(tmp_path):
    counts = WordCounter().add_all(["the cat and the hat", "The end"]).counts
    save_words(counts, tmp_path)
    lines = (tmp_path / WORDS_FILE).read_text().splitlines()
    assert lines[0] == "the 3" and sorted(lines[1:]) == ["and 1", "cat 1", "end 1", "hat 1"]
    assert load_words(tmp_path) == {"the": 3, "cat": 1, "and": 1, "hat": 1, "end": 1}
    assert load_words(tmp_path / "elsewhere") is None


def test_a_huge_count_lets_go_of_words_seen_once(monkeypatch, tmp_path):
    monkeypatch.setattr(words_module, "PRUNE_AT", 4)
    counter = WordCounter().add_all(["alpha beta beta", "gamma delta"])  # the fourth distinct word prunes
    assert dict(counter.counts) == {"beta": 2}
    monkeypatch.setattr(words_module, "MAX_SAVED", 1)
    save_words({"rare": 1, "common": 9}, tmp_path)
    assert load_words(tmp_path) == {"common": 9}


@pytest.mark.parametrize("line", ["the", "The 3", "the three", "two words 2"])
def test_a_damaged_words_file_names_its_line(tmp_path, line):
    (tmp_path / WORDS_FILE).write_text(f"of 7\n{line}\n")
    with pytest.raises(TokenizerError, match=rf"{WORDS_FILE}:2: .* not a 'word count' line"):
        load_words(tmp_path)


def test_words_travel_with_the_tokenizer_and_its_grown_copies(tmp_path):
    tokenizer = CharTokenizer("abc ", specials=[EOS])
    tokenizer.words = {"cab": 2}
    grown = tokenizer.with_added(chars="#", specials=["<|user|>"])
    assert grown is not tokenizer and grown.words == {"cab": 2}
    assert load_tokenizer(grown.save(tmp_path / "tok")).words == {"cab": 2}
    assert load_tokenizer(CharTokenizer("abc").save(tmp_path / "bare")).words is None


def test_prepare_counts_the_words_of_the_train_split_only(tmp_path, mirror):
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    prepared = prepare_corpus(open_corpus(str(mirror / "the-verdict.txt")), "char", tmp_path / "p", val_fraction=0.1)
    cut = int(len(text) * 0.9)  # the split: the first 90% of characters are train
    only_val = set(words_of(text[cut:])) - set(words_of(text[:cut]))
    assert only_val, "the-verdict's last tenth has words of its own"
    words = prepared.tokenizer.words
    assert words == Counter(words_of(text[:cut]))
    assert not only_val & set(words)
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["words"] == len(words)
    assert load_words(tmp_path / "p" / "tokenizer") == words


def test_a_folder_prepared_before_words_were_counted_is_prepared_again(tmp_path, mirror):
    corpus = open_corpus(str(mirror / "the-verdict.txt"))
    prepare_corpus(corpus, "char", tmp_path / "p")
    meta_path = tmp_path / "p" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["words"]
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "p" / "tokenizer" / WORDS_FILE).unlink()
    again = prepare_corpus(corpus, "char", tmp_path / "p")
    assert again.tokenizer.words and "words" in json.loads(meta_path.read_text())


def test_a_checkpoint_with_a_damaged_words_file_is_one_line(tmp_path, capsys):
    from kiln.checkpoint import save_checkpoint
    from kiln.cli import main
    from kiln.model.gpt import GPT, GPTConfig

    tokenizer = CharTokenizer("abc ", specials=[EOS])
    tokenizer.words = {"cab": 2}
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8)
    folder = save_checkpoint(tmp_path / "ck", GPT(config), tokenizer)
    (folder / "tokenizer" / WORDS_FILE).write_text("cab 2\ncab\n")
    assert main(["sample", str(folder), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{WORDS_FILE}:2: 'cab' is not a 'word count' line" in err[0]
