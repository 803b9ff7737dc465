"""The `kiln` command: help, version, the data commands, and one clear line (exit 2) for every bad input."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys

import pytest

import kiln
from kiln.cli import main
from kiln.generate.sampling import SamplingConfig


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_help_lists_every_command_and_version_prints():
    result = subprocess.run([sys.executable, "-m", "kiln", "--help"], capture_output=True, text=True, check=True)
    for command in (
        "data",
        "tokenizer",
        "prepare",
        "presets",
        "train",
        "sample",
        "finetune",
        "chat",
        "evaluate",
        "merge",
        "demo",
    ):
        assert f"    {command} " in result.stdout
    version = subprocess.run([sys.executable, "-m", "kiln", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"kiln {kiln.__version__}"


def test_data_list_shows_local_copies(capsys, mirror):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "mirror" in rows["tinyshakespeare"] and "1.1 MB" in rows["tinyshakespeare"]
    assert "CC BY-NC 4.0" in rows["alpaca"] and " no " in rows["alpaca"]
    assert "built in" in rows["python-docs"]


def test_data_get_reports_where_the_files_are(capsys, mirror):
    code, out, _ = run(capsys, "data", "get", "wikitext-2")
    assert code == 0
    assert f"wikitext-2 val: {mirror / 'wikitext-2' / 'valid.txt'}" in out


def test_tokenizer_train_then_prepare_with_it(capsys, tmp_path, mirror):
    code, out, _ = run(
        capsys, "tokenizer", "train", "tinyshakespeare", "--vocab-size", "4096", "--out", str(tmp_path / "tok")
    )
    assert code == 0 and "bpe (4,096 tokens)" in out
    meta = json.loads((tmp_path / "tok" / "kiln_tokenizer.json").read_text())
    assert meta["kind"] == "bpe" and meta["special_tokens"]["<|endoftext|>"] == 0
    code, out, _ = run(
        capsys, "prepare", "the-verdict", "--tokenizer", f"bpe:{tmp_path / 'tok'}", "--out", str(tmp_path / "data")
    )
    assert code == 0 and "bpe tokenizer, vocab 4,096, uint16" in out


def test_prepare_prints_a_summary(capsys, tmp_path, mirror):
    code, out, _ = run(capsys, "prepare", "tinyshakespeare", "--tokenizer", "char", "--out", str(tmp_path / "c"))
    assert code == 0
    assert "train 1,003,854 tokens, val 111,540 tokens" in out


def test_demo_prepares_trains_samples_finetunes_chats_scores_and_says_how_to_go_on(
    capsys, tmp_path, mirror, monkeypatch
):
    # A model trained for seconds never stops on its own: short samples, answers and scores keep this quick.
    monkeypatch.setattr("kiln.demo.SAMPLE_TOKENS", 8)
    monkeypatch.setattr("kiln.demo.CHAT_SAMPLING", SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=50, seed=0))
    monkeypatch.setattr("kiln.demo.HELD_OUT_TOKENS", 4)
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--time", "4s", "--finetune-time", "5s")
    assert code == 0
    assert "wikitext-2 + instruction-data train x3, BPE 4,096" in out and "BPE trained in" in out
    assert (tmp_path / "demo" / "wikitext-2-bpe4096" / "train.bin").is_file()
    (run_dir,) = (tmp_path / "demo").glob("chatbot-cpu-*")
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "loss.png").is_file()
    assert "best val loss" in out and "sample 2" in out
    assert "full fine-tuning" in out and "you> Name three primary colors." in out
    assert out.count("assistant> ") == 3  # three questions; the /set line answers in its own words
    assert out.count("conversation cleared") == 2  # each question on its own, as the model learnt them
    assert "train holds 3 of each original example and" in out and "word-swapped copies" in out
    assert (run_dir / "sft-copying" / "last").is_dir() and "last weights: " in out  # then the examples alone
    assert "55 held-out questions" in out and "ROUGE-L" in out and "answer loss" in out
    assert "before fine-tuning" in out and "after fine-tuning" in out
    chat, sample = out.strip().splitlines()[-2:]
    assert chat == f"kiln chat {run_dir / 'sft' / 'last'}"
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi.\n/quit\n"))
    assert run(capsys, *shlex.split(chat)[1:], "--max-new-tokens", "5")[0] == 0
    assert sample.startswith(f"kiln sample {run_dir / 'best'} --prompt")
    assert run(capsys, *shlex.split(sample)[1:], "--max-new-tokens", "5")[0] == 0


def test_demo_falls_back_to_python_docs_when_wikitext_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "empty-mirror"))
    monkeypatch.setattr("kiln.data.registry.DATASETS", _offline_registry())
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--time", "2s", "--finetune-time", "2s")
    assert code == 0
    assert "WikiText-2 could not be obtained" in out and "python-docs" in out
    assert (tmp_path / "demo" / "python-docs-bpe4096" / "train.bin").is_file()
    assert "skipping fine-tuning" in out  # the instruction set is not to be had either


def _offline_registry():
    """The registry with every download address pointing at a closed local port."""
    from dataclasses import replace

    from kiln.data.registry import DATASETS

    return {
        name: replace(
            ds, files={role: replace(f, urls=("http://127.0.0.1:9/" + f.path,)) for role, f in ds.files.items()}
        )
        for name, ds in DATASETS.items()
    }


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.dat").write_bytes(b"\x7fELF\0\0\0")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "mirror" / "demo").mkdir(parents=True)
    return tmp_path


BAD_INPUTS = {
    "missing file": (["prepare", "{d}/nope.txt", "--out", "{d}/o"], ["nope.txt: no such file or folder"]),
    "unknown data set": (["prepare", "tinyshakespear", "--out", "{d}/o"], ["did you mean tinyshakespeare"]),
    "empty corpus": (["prepare", "{d}/empty.txt", "--out", "{d}/o"], ["empty.txt: the corpus is empty"]),
    "binary input": (["prepare", "{d}/binary.dat", "--out", "{d}/o"], ["binary.dat: looks binary", "--errors replace"]),
    "not utf-8": (
        ["prepare", "{d}/latin1.txt", "--tokenizer", "char", "--out", "{d}/o"],
        ["latin1.txt: not UTF-8 at byte 3", "--errors replace"],
    ),
    "malformed jsonl": (
        ["prepare", "{d}/bad.jsonl", "--out", "{d}/o"],
        ["bad.jsonl:2: not valid JSON", "--skip-bad-lines"],
    ),
    "not kiln's folder": (
        ["prepare", "the-verdict", "--out", "{d}/mine"],
        ["mine: exists and is not a Kiln", "--force"],
    ),
    "bad val fraction": (["prepare", "the-verdict", "--val-fraction", "1", "--out", "{d}/o"], ["--val-fraction 1.0"]),
    "unknown tokenizer": (
        ["prepare", "the-verdict", "--tokenizer", "gpt-2", "--out", "{d}/o"],
        ["unknown tokenizer 'gpt-2'"],
    ),
    "bpe folder missing": (
        ["prepare", "the-verdict", "--tokenizer", "bpe:{d}/mine", "--out", "{d}/o"],
        ["not a Kiln tokenizer folder"],
    ),
    "tiny bpe vocabulary": (
        ["tokenizer", "train", "the-verdict", "--vocab-size", "10", "--out", "{d}/t"],
        ["at least 261"],
    ),
    "unknown data get": (["data", "get", "wikitext2"], ["did you mean wikitext-2"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_exit_2(case, capsys, files, mirror):
    argv, fragments = BAD_INPUTS[case]
    code, _, err = run(capsys, *[a.format(d=files) for a in argv])
    assert_one_line_error(code, err, *fragments)
    assert not (files / "o").exists()
    assert (files / "mine" / "thesis.tex").read_text() == "precious"


def test_skip_bad_lines_goes_on_and_counts(capsys, files, mirror):
    code, out, err = run(
        capsys,
        "prepare",
        str(files / "bad.jsonl"),
        "--skip-bad-lines",
        "--val-fraction",
        "0",
        "--out",
        str(files / "o"),
    )
    assert code == 0 and "skipped 1 malformed lines" in err


def test_errors_replace_goes_on(capsys, files):
    code, out, _ = run(
        capsys,
        "prepare",
        str(files / "latin1.txt"),
        "--tokenizer",
        "char",
        "--errors",
        "replace",
        "--val-fraction",
        "0",
        "--out",
        str(files / "o"),
    )
    assert code == 0 and "train 12 tokens" in out


def test_checksum_mismatch_in_the_mirror(capsys, tmp_path, mirror):
    (tmp_path / "the-verdict.txt").write_text("not the verdict")
    code, _, err = run(capsys, "--data-dir", str(tmp_path), "prepare", "the-verdict", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "the-verdict.txt: it has 15 bytes, expected 20,479")


def test_prepared_with_another_tokenizer(capsys, tmp_path, mirror):
    assert run(capsys, "prepare", "the-verdict", "--tokenizer", "char", "--out", str(tmp_path / "v"))[0] == 0
    code, _, err = run(capsys, "prepare", "the-verdict", "--tokenizer", "gpt2", "--out", str(tmp_path / "v"))
    assert_one_line_error(code, err, "prepared with the char tokenizer, not gpt2")


def test_vocabulary_too_large_for_the_dtype(capsys, tmp_path):
    (tmp_path / "wide.txt").write_text("".join(chr(0x20000 + i) for i in range(66_000)), encoding="utf-8")
    code, _, err = run(
        capsys,
        "prepare",
        str(tmp_path / "wide.txt"),
        "--tokenizer",
        "char",
        "--dtype",
        "uint16",
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(code, err, "66,000 tokens does not fit uint16", "--dtype uint32")


def test_offline_download_error_names_where_to_put_the_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("kiln.data.registry.DATASETS", _offline_registry())
    code, _, err = run(capsys, "--data-dir", str(tmp_path / "m"), "data", "get", "tinystories")
    assert_one_line_error(
        code,
        err,
        "could not get http://127.0.0.1:9/tinystories/TinyStoriesV2-GPT4-valid.txt",
        str(tmp_path / "m" / "tinystories" / "TinyStoriesV2-GPT4-valid.txt"),
    )


def test_debug_shows_the_traceback(tmp_path):
    from kiln.errors import DataError

    with pytest.raises(DataError):
        main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), "--debug"])


def test_presets_lists_the_shapes_with_their_sizes(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert {"tiny", "nanogpt-cpu", "gpt2-124m"} <= set(rows)
    assert "124.44M" in rows["gpt2-124m"]


def test_train_then_resume_then_sample(capsys, tmp_path, mirror):
    run_dir = str(tmp_path / "run")
    argv = [
        "train",
        "--data",
        "the-verdict",
        "--tokenizer",
        "char",
        "--preset",
        "tiny",
        "--set",
        "n_layer=1",
        "--set",
        "block_size=32",
        "--set",
        "eval_interval=10",
        "--set",
        "eval_batches=2",
        "--out",
        run_dir,
    ]
    code, out, err = run(capsys, *argv, "--max-iters", "10")
    assert code == 0, err
    from kiln.model.gpt import GPT, GPTConfig

    params = GPT(GPTConfig(vocab_size=62, block_size=32, n_layer=1, n_head=2, n_embd=128)).num_params()
    assert f"{params / 1e6:.2f}M parameters" in out and "best val loss" in out and "sample:" in out
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    code, _, err = run(capsys, *argv, "--max-iters", "10")
    assert_one_line_error(code, err, "already holds a run; pass --resume")
    code, out, _ = run(capsys, *argv, "--max-iters", "20", "--resume")
    assert code == 0 and "20 steps" in out
    code, out, _ = run(
        capsys, "sample", f"{run_dir}/best", "--prompt", "I had", "--max-new-tokens", "30", "--seed", "1"
    )
    assert code == 0 and out.startswith("I had") and len(out) > len("I had") + 10
    code, out, _ = run(
        capsys,
        "sample",
        f"{run_dir}/best",
        "--prompt",
        "I had",
        "--stop",
        "\\n",
        "--seed",
        "1",
        "--max-new-tokens",
        "300",
    )
    assert code == 0 and "\n" not in out.removesuffix("\n")  # the typed \n stops at the first newline
    code, unstopped, _ = run(
        capsys, "sample", f"{run_dir}/best", "--prompt", "I had", "--seed", "1", "--max-new-tokens", "300"
    )
    assert "\n" in unstopped.removesuffix("\n") and unstopped.startswith(out.removesuffix("\n"))
    from kiln.checkpoint import load_checkpoint
    from kiln.data.words import words_of

    known = set(load_checkpoint(f"{run_dir}/best").tokenizer.words) | {"i", "had"}
    assert sum(w not in known for w in words_of(unstopped)) > 5  # ten steps of training spell few words
    code, held, _ = run(
        capsys,
        "sample",
        f"{run_dir}/best",
        "--prompt",
        "I had",
        "--seed",
        "1",
        "--max-new-tokens",
        "300",
        "--known-words",
    )
    whole = words_of(held.rstrip()) if not held.rstrip()[-1:].isalpha() else words_of(held)[:-1]
    assert code == 0 and len(whole) > 10 and [w for w in whole if w not in known] == []


TRAIN_MISTAKES = {
    "unknown preset": (["--preset", "huge"], ["unknown preset 'huge'"]),
    "unknown setting": (["--set", "n_layers=2"], ["unknown setting 'n_layers' (did you mean n_layer?)"]),
    "wrong type": (["--set", "n_layer=two"], ["--set n_layer=two: expected int"]),
    "bad duration": (["--max-time", "soon"], ["--max-time soon: write a duration"]),
    "no limit": ([], ["give a limit"]),
    "block too large": (["--set", "block_size=100000", "--max-iters", "1"], ["shorter than one window"]),
    "resume nothing": (["--resume", "--max-iters", "1"], ["nothing to resume"]),
}


@pytest.mark.parametrize("case", TRAIN_MISTAKES, ids=list(TRAIN_MISTAKES))
def test_train_mistakes_are_one_line(case, capsys, tmp_path, mirror):
    extra, fragments = TRAIN_MISTAKES[case]
    code, _, err = run(
        capsys, "train", "--data", "the-verdict", "--tokenizer", "char", "--out", str(tmp_path / "r"), *extra
    )
    assert_one_line_error(code, err, *fragments)


def test_sample_from_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "sample", str(tmp_path))
    assert_one_line_error(code, err, "not a Kiln checkpoint")
