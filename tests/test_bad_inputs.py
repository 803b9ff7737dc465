"""Inputs a new user gets wrong: each is one line and exit 2 (or, in chat, one line and the chat goes
on), never a traceback; and text files read as a person means them (BOM, CRLF, UTF-16)."""

from __future__ import annotations

import io
import shutil
import string

import pytest
import torch

from kiln import cli
from kiln.checkpoint import save_checkpoint
from kiln.cli import main
from kiln.data.prepared import PreparedCorpus
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *fragments: str, prefix: str = "kiln: error: ") -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(string.ascii_letters + " #:\n.", specials=[EOS])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, info={"template": "alpaca"})


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "missing"])
def test_a_damaged_weights_file_is_one_line_naming_it(capsys, tmp_path, checkpoint, damage):
    weights = checkpoint / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "not safetensors":
        weights.write_text("this is not a tensor file")
    else:
        weights.unlink()
    code, _, err = run(capsys, "sample", str(checkpoint))
    assert code == 2
    assert_one_line(code, err, str(weights), "use another checkpoint")


@pytest.mark.parametrize("out", ["/dev/null/run", "/proc/kiln-run"])
def test_an_out_that_cannot_be_written_is_one_line(capsys, mirror, out):
    code, _, err = run(
        capsys, "train", "--data", "the-verdict", "--tokenizer", "char", "--max-iters", "1", "--out", out
    )
    assert code == 2
    assert_one_line(code, err, out, "check the path")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_set_device_cuda_without_cuda_is_one_line(capsys, mirror, tmp_path):
    argv = ["train", "--data", "the-verdict", "--tokenizer", "char", "--max-iters", "1", "--out", str(tmp_path / "r")]
    code, _, err = run(capsys, *argv, "--set", "device=cuda")
    assert code == 2
    assert_one_line(code, err, "no CUDA GPU")


def test_chat_says_which_character_it_cannot_read_and_goes_on(capsys, checkpoint, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("what is <b>?\nhello\n"))
    code, out, _ = run(capsys, "chat", str(checkpoint), "--max-new-tokens", "3", "--seed", "1")
    assert code == 0
    assert "not sent: this model cannot read '<' (U+003C)" in out
    assert out.count("assistant> ") == 1  # "hello" was answered


def test_text_files_with_a_bom_crlf_or_utf16_read_as_their_text(capsys, tmp_path):
    samples = {
        "bom.txt": b"\xef\xbb\xbf" + b"Hello there\r\nGeneral Kenobi\r\n" * 20,
        "utf16.txt": ("Hello there\nGeneral Kenobi\n" * 20).encode("utf-16"),
    }
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
        code, _, err = run(
            capsys, "prepare", str(tmp_path / name), "--tokenizer", "char", "--out", str(tmp_path / name[:-4])
        )
        assert code == 0, err
        prepared = PreparedCorpus.open(tmp_path / name[:-4])
        text = prepared.tokenizer.decode([*prepared.tokens("train"), *prepared.tokens("val")])
        assert text == "Hello there\nGeneral Kenobi\n" * 20
        assert "\ufeff" not in prepared.tokenizer.decode(range(prepared.tokenizer.vocab_size))


def test_a_corpus_of_only_whitespace_is_refused(capsys, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\t\n   \n")
    code, _, err = run(
        capsys, "prepare", str(tmp_path / "blank.txt"), "--tokenizer", "char", "--out", str(tmp_path / "p")
    )
    assert code == 2
    assert_one_line(code, err, "holds only whitespace")
    assert not (tmp_path / "p").exists()


def test_an_unexpected_exception_is_one_line_that_says_it_is_a_bug(capsys, monkeypatch, checkpoint):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, ("sample", None), broken)
    code, _, err = run(capsys, "sample", str(checkpoint))
    assert code == 1
    assert_one_line(code, err, "ZeroDivisionError", "This is a bug in Kiln", "--debug", prefix="kiln: internal error")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "sample", str(checkpoint)])
    shutil.rmtree(checkpoint)
