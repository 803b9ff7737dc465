"""`prepare` turns text into token files with the published split figures, streaming and atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.data import prepare as prepare_module
from kiln.data.chunking import safe_chunks
from kiln.data.corpus import open_corpus
from kiln.data.prepare import prepare_corpus
from kiln.data.prepared import PreparedCorpus
from kiln.errors import ConfigError, DataError


def test_tiny_shakespeare_char_split_is_nanogpts(shakespeare_prepared, shakespeare_text):
    char = shakespeare_prepared["char"]
    assert char.meta["splits"]["train"]["tokens"] == 1_003_854
    assert char.meta["splits"]["val"]["tokens"] == 111_540
    assert char.meta["tokenizer"]["vocab_size"] == 65
    assert char.dtype == np.uint16
    decoded = char.tokenizer.decode(char.tokens("train").tolist()) + char.tokenizer.decode(char.tokens("val").tolist())
    assert decoded == shakespeare_text


def test_tiny_shakespeare_gpt2_split_is_nanogpts(shakespeare_prepared):
    gpt2 = shakespeare_prepared["gpt2"]
    assert gpt2.meta["splits"]["train"]["tokens"] == 301_966
    assert gpt2.meta["splits"]["val"]["tokens"] == 36_059
    assert gpt2.meta["source"]["sha256"]["all"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_encoding_in_small_chunks_equals_encoding_whole(monkeypatch, tmp_path, mirror, gpt2, shakespeare_text):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 5_000)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)
    prepared = prepare_corpus(open_corpus("tinyshakespeare", mirror), "gpt2", tmp_path / "p", data_dir=mirror)
    cut = int(len(shakespeare_text) * 0.9)
    assert prepared.tokens("train").tolist() == gpt2.encode(shakespeare_text[:cut])
    assert prepared.tokens("val").tolist() == gpt2.encode(shakespeare_text[cut:])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab \n\t'é1.,"), max_size=400), size=st.integers(1, 50))
def test_safe_chunks_rejoin_and_cut_only_before_whitespace(text, size):
    chunks = list(safe_chunks(iter([text[i : i + 7] for i in range(0, len(text), 7)]), size))
    assert "".join(chunks) == text
    for chunk, following in zip(chunks, chunks[1:], strict=False):
        assert not chunk[-1].isspace() and following[0].isspace()
        # a chunk is longer than `size` only when its first `size` characters hold no safe cut
        assert len(chunk) <= size or not any(chunk[i].isspace() and not chunk[i - 1].isspace() for i in range(1, size))


def test_documents_are_separated_by_eos(tmp_path, mirror):
    (tmp_path / "docs").mkdir()
    for name, text in [("1.txt", "First story."), ("2.txt", "Second story."), ("3.txt", "Third.")]:
        (tmp_path / "docs" / name).write_text(text)
    prepared = prepare_corpus(open_corpus(tmp_path / "docs"), "gpt2", tmp_path / "out", val_fraction=0, data_dir=mirror)
    ids = prepared.tokens("train").tolist()
    assert ids.count(50_256) == 2
    assert prepared.tokenizer.decode(ids) == "First story.<|endoftext|>Second story.<|endoftext|>Third."
    assert prepared.meta["splits"]["train"]["documents"] == 3
    char = prepare_corpus(open_corpus(tmp_path / "docs"), "char", tmp_path / "char", val_fraction=0)
    assert char.tokenizer.decode(char.tokens("train").tolist()).count("<|endoftext|>") == 2


@pytest.mark.parametrize(
    ("val_fraction", "train", "val", "val_documents"),
    [
        # 31 characters: the cut at 21 falls inside the second story, so val opens mid-document
        (0.3, "First story.<|endoftext|>Second st", "ory.<|endoftext|>Third.", 2),
        # the cut at 25 falls between the second and third stories: the EOS ends train and opens val
        (0.19, "First story.<|endoftext|>Second story.<|endoftext|>", "<|endoftext|>Third.", 1),
    ],
)
def test_the_val_split_keeps_the_eos_between_documents(tmp_path, val_fraction, train, val, val_documents):
    (tmp_path / "docs").mkdir()
    for name, text in [("1.txt", "First story."), ("2.txt", "Second story."), ("3.txt", "Third.")]:
        (tmp_path / "docs" / name).write_text(text)
    prepared = prepare_corpus(open_corpus(tmp_path / "docs"), "char", tmp_path / "out", val_fraction=val_fraction)
    decode = prepared.tokenizer.decode
    assert (decode(prepared.tokens("train").tolist()), decode(prepared.tokens("val").tolist())) == (train, val)
    assert prepared.meta["splits"]["val"]["documents"] == val_documents


def test_data_sets_with_their_own_validation_file_use_it(tmp_path, mirror):
    prepared = prepare_corpus(open_corpus("wikitext-2", mirror), "char", tmp_path / "wt2")
    assert prepared.meta["splits"]["train"]["chars"] == len((mirror / "wikitext-2/train.txt").read_text())
    assert prepared.meta["splits"]["val"]["chars"] == len((mirror / "wikitext-2/valid.txt").read_text())
    assert prepared.meta["val_fraction"] is None


def test_an_unchanged_request_reuses_the_folder(tmp_path, mirror):
    first = prepare_corpus(open_corpus("the-verdict", mirror), "gpt2", tmp_path / "v", data_dir=mirror)
    stamp = (first.folder / "train.bin").stat().st_mtime_ns
    again = prepare_corpus(open_corpus("the-verdict", mirror), "gpt2", tmp_path / "v", data_dir=mirror)
    assert (again.folder / "train.bin").stat().st_mtime_ns == stamp
    other_split = prepare_corpus(
        open_corpus("the-verdict", mirror), "gpt2", tmp_path / "v", val_fraction=0.2, data_dir=mirror
    )
    assert other_split.meta["val_fraction"] == 0.2


def test_a_failure_half_way_leaves_the_previous_folder_intact(monkeypatch, tmp_path, mirror):
    out = tmp_path / "v"
    prepare_corpus(open_corpus("the-verdict", mirror), "char", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1_000)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2_000)
    calls = {"n": 0}
    real_write = prepare_module._SplitWriter.write

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_write(self, *args)

    monkeypatch.setattr(prepare_module._SplitWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(open_corpus("the-verdict", mirror), "char", out, val_fraction=0.3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no temporary folders left


def test_another_tokenizer_into_a_prepared_folder_needs_force(tmp_path, mirror):
    prepare_corpus(open_corpus("the-verdict", mirror), "char", tmp_path / "v")
    with pytest.raises(DataError, match="prepared with the char tokenizer, not gpt2; .*--force"):
        prepare_corpus(open_corpus("the-verdict", mirror), "gpt2", tmp_path / "v", data_dir=mirror)
    replaced = prepare_corpus(open_corpus("the-verdict", mirror), "gpt2", tmp_path / "v", force=True, data_dir=mirror)
    assert replaced.meta["tokenizer"]["kind"] == "gpt2"


def test_opening_prepared_data_with_another_tokenizer_is_refused(shakespeare_prepared, gpt2):
    folder = shakespeare_prepared["char"].folder
    with pytest.raises(DataError, match="prepared with the char tokenizer, not the gpt2 one"):
        PreparedCorpus.open(folder, expect_tokenizer=gpt2)
    assert PreparedCorpus.open(folder, expect_tokenizer=shakespeare_prepared["char"].tokenizer).meta


def test_output_folder_that_is_not_kilns_needs_force(tmp_path, mirror):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine: exists and is not a Kiln prepared corpus"):
        prepare_corpus(open_corpus("the-verdict", mirror), "char", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    prepare_corpus(open_corpus("the-verdict", mirror), "char", tmp_path / "mine", force=True)
    assert not (tmp_path / "mine" / "notes.txt").exists()


def test_vocabulary_too_large_for_uint16(tmp_path):
    (tmp_path / "wide.txt").write_text(
        "".join(chr(0x4E00 + i) for i in range(20_000)) + "".join(chr(0x20000 + i) for i in range(50_000)),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="70,000 tokens does not fit uint16"):
        prepare_corpus(open_corpus(tmp_path / "wide.txt"), "char", tmp_path / "out", dtype="uint16")
    prepared = prepare_corpus(open_corpus(tmp_path / "wide.txt"), "char", tmp_path / "out")
    assert prepared.dtype == np.uint32
    assert prepared.tokens("val").max() >= 65_536


def test_empty_corpus_and_bad_fraction(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the corpus is empty"):
        prepare_corpus(open_corpus(tmp_path / "empty.txt"), "char", tmp_path / "out")
    (tmp_path / "some.txt").write_text("some text")
    with pytest.raises(ConfigError, match="--val-fraction 1.5"):
        prepare_corpus(open_corpus(tmp_path / "some.txt"), "char", tmp_path / "out", val_fraction=1.5)
    assert not (tmp_path / "out").exists()


def test_meta_json_records_what_made_the_files(shakespeare_prepared):
    meta = json.loads((shakespeare_prepared["gpt2"].folder / "meta.json").read_text())
    assert meta["kiln"] == "prepared-corpus"
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["tokenizer"]["eos_id"] == 50_256
    assert meta["dtype"] == "uint16"
    assert (shakespeare_prepared["gpt2"].folder / "tokenizer" / "vocab.bpe").is_file()


def test_a_file_fingerprints_the_same_by_path_or_by_name(mirror):
    by_name = open_corpus("tinyshakespeare", mirror)["all"].fingerprint()
    assert open_corpus(mirror / "tinyshakespeare.txt")["all"].fingerprint() == by_name


def test_reusing_a_subword_corpus_does_not_read_the_text_again(tmp_path, mirror, monkeypatch):
    corpora = open_corpus("the-verdict", mirror)
    first = prepare_corpus(corpora, "gpt2", tmp_path / "v", data_dir=mirror)

    def no_reading(self):
        raise AssertionError("documents were read although the folder could be reused")

    monkeypatch.setattr(type(corpora["all"]), "documents", no_reading)
    assert prepare_corpus(corpora, "gpt2", tmp_path / "v", data_dir=mirror).meta == first.meta


def test_processes_asking_for_one_cached_corpus_at_once_all_get_it_whole(tmp_path, mirror):
    """Every rank of a run asks for the same cached corpus at the same moment; none may sweep away the
    folder another is writing (a CI failure once), and all end with the same data."""
    # Writing is slowed so that the others surely arrive while the first one is half way; each process
    # says whether it wrote the folder or found it made.
    ask = (
        "import time; from kiln.data import prepare; encode = prepare._encode_into; wrote = []\n"
        "prepare._encode_into = lambda *a: (wrote.append(1), time.sleep(1), encode(*a))\n"
        "from kiln.train.run import training_data\n"
        "corpus = training_data('the-verdict', 'char', None)\n"
        "print(corpus.folder, 'wrote' if wrote else 'reused', len(corpus.tokens('train')))"
    )
    env = {**os.environ, "KILN_DATA_DIR": str(mirror), "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", ask], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    reports = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        reports.append(stdout.split())
    assert len({folder for folder, _, _ in reports}) == 1
    assert sorted(how for _, how, _ in reports) == ["reused", "reused", "reused", "wrote"]
    assert {int(tokens) for _, _, tokens in reports} == {18_431}
    folder = reports[0][0]
    assert not list(Path(folder).parent.glob("*.part"))
