"""Inputs a new user gets wrong: each is one line and exit 2 (or, in chat, one line and the chat goes
on), never a traceback; and text files read as a person means them (BOM, CRLF, UTF-16)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import stat
import string
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kiln import cli
from kiln.atomic import atomic_dir
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


# The sweep: each command given a missing, empty, damaged, wrong-format, wrong-encoding, huge or
# unwritable input or output ends in one line naming the file or setting, exit 2, and leaves nothing
# half-written where it was asked to write.

LATIN1 = "Caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20
BINARY = bytes(range(256)) * 20
QUESTIONS = [("Name a colour.", "Blue."), ("Say hello.", "Hello!"), ("Spell cat backwards.", "tac")]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Tiny things to damage copies of: a checkpoint, a LoRA adapter on it, a llama-style checkpoint
    with a BPE tokenizer (for GGUF), instruction records, a text file and a prepared corpus."""
    from kiln.checkpoint import save_adapter
    from kiln.data.corpus import open_corpus
    from kiln.data.prepare import prepare_corpus
    from kiln.data.tokenizers import BPETokenizer
    from kiln.model.lora import LoraSettings, add_lora

    root = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    chars = CharTokenizer(string.ascii_letters + " #:\n.,!?'", specials=[EOS])
    config = GPTConfig(vocab_size=chars.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    ckpt = save_checkpoint(root / "ckpt", GPT(config), chars, info={"template": "alpaca"})
    adapter = save_adapter(root / "adapter", add_lora(GPT(config), LoraSettings(r=2)), ckpt, chars)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    bpe = BPETokenizer.train([text.read_text()], vocab_size=300)
    llama = GPTConfig(vocab_size=bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16, block_style="llama")
    bpe_ckpt = save_checkpoint(root / "bpe-ckpt", GPT(llama), bpe, info={"template": "alpaca"})
    instructions = root / "instructions.json"
    openings = ("", "Now, ", "Please, ", "Quick: ")
    instructions.write_text(json.dumps([{"instruction": o + q, "output": a} for o in openings for q, a in QUESTIONS]))
    prepared = prepare_corpus(open_corpus(str(text)), "char", root / "prepared").folder
    return SimpleNamespace(
        ckpt=ckpt, adapter=adapter, bpe_ckpt=bpe_ckpt, text=text, instructions=instructions, prepared=prepared
    )


class Place:
    """Where a case writes its inputs (`file`, `copy` of a made thing with a damage done to it) and
    names its outputs (`out`, `run`: paths that must hold nothing afterwards)."""

    def __init__(self, root: Path, made: SimpleNamespace, monkeypatch):
        self.root, self.made, self.monkeypatch, self.outputs = root, made, monkeypatch, []

    def file(self, name: str, data: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def folder(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return str(self.root / name)

    def copy(self, what: str, damage=None) -> str:
        path = self.root / what
        shutil.copytree(getattr(self.made, what.replace("-", "_")), path)
        if damage:
            damage(path)
        return str(path)

    def out(self, name: str, under: Path | None = None) -> str:
        self.outputs.append((under or self.root) / name)
        return str(self.outputs[-1])

    def run(self, name: str, under: Path) -> str:
        """A run folder, whose last/ checkpoint must not be there afterwards."""
        self.outputs.append(under / name / "last")
        return str(under / name)

    def port_in_use(self) -> str:
        """A port another program listens on (until the test ends)."""
        self.listening = socket.create_server(("127.0.0.1", 0))
        return str(self.listening.getsockname()[1])

    def device(self, name: str) -> str:
        """A character device like /dev/full (as root), or a named pipe: no file to replace."""
        path = self.root / name
        if os.geteuid() == 0:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        else:
            os.mkfifo(path)
        return str(path)


def edit_json(name: str, change):
    def damage(folder: Path) -> None:
        (folder / name).write_text(json.dumps(change(json.loads((folder / name).read_text()))))

    return damage


def write(name: str, data: bytes | str):
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def cut(name: str, size: int):
    def damage(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:size])

    return damage


def other_shape(config: dict) -> dict:
    return {**config, "model": {**config["model"], "n_embd": 32}}


def removed(name: str):
    def damage(folder: Path) -> None:
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def a_folder(name: str):
    def damage(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return damage


def no_cache(p: Place) -> list[str]:
    p.monkeypatch.setenv("XDG_CACHE_HOME", p.file("cache-is-a-file", "x"))
    p.monkeypatch.setenv("KILN_DATA_DIR", p.folder("empty-mirror"))
    return ["data", "get", "the-verdict"]


TRAIN = ["--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "block_size=16"]
TRAIN += ["--set", "batch_size=2", "--set", "eval_batches=1", "--max-iters", "1"]

# id: (the command line, given a Place; fragments its one line holds)
BAD_INPUTS = {
    "data get: unknown name": (lambda p: ["data", "get", "no-such-set"], ["no file or data set called"]),
    "data get: mirror copy cut short": (
        lambda p: [
            "--data-dir",
            str(Path(p.file("mirror/the-verdict.txt", "x" * 100)).parent),
            "data",
            "get",
            "the-verdict",
        ],
        ["the-verdict.txt: it has 100 bytes, expected 20,479", "replace it"],
    ),
    "data get: the cache folder is a file": (no_cache, ["could not get", "Not a directory", "place it at"]),
    "tokenizer train: empty file": (
        lambda p: ["tokenizer", "train", p.file("empty.txt", b""), "--out", p.out("tok")],
        ["empty.txt: is empty (no text found)"],
    ),
    "tokenizer train: whitespace only": (
        lambda p: ["tokenizer", "train", p.file("blank.txt", " \n\t\n"), "--out", p.out("tok")],
        ["blank.txt: holds only whitespace"],
    ),
    "tokenizer train: Latin-1": (
        lambda p: ["tokenizer", "train", p.file("latin.txt", LATIN1), "--out", p.out("tok")],
        ["latin.txt: not UTF-8 at byte 3", "--errors replace"],
    ),
    "tokenizer train: binary": (
        lambda p: ["tokenizer", "train", p.file("bin.txt", BINARY), "--out", p.out("tok")],
        ["bin.txt: looks binary"],
    ),
    "tokenizer train: missing": (
        lambda p: ["tokenizer", "train", str(p.root / "nope.txt"), "--out", p.out("tok")],
        ["nope.txt: no such file or folder"],
    ),
    "tokenizer train: --min-frequency -1": (
        lambda p: ["tokenizer", "train", str(p.made.text), "--min-frequency", "-1", "--out", p.out("tok")],
        ["--min-frequency -1 must be 0 or more"],
    ),
    "tokenizer train: --vocab-size 0": (
        lambda p: ["tokenizer", "train", str(p.made.text), "--vocab-size", "0", "--out", p.out("tok")],
        ["--vocab-size 0 is too small"],
    ),
    "tokenizer train: --out holds other files": (
        lambda p: ["tokenizer", "train", str(p.made.text), "--out", str(Path(p.file("mine/notes.txt", "x")).parent)],
        ["mine: already holds something else"],
    ),
    "tokenizer train: --out under a file": (
        lambda p: ["tokenizer", "train", str(p.made.text), "--vocab-size", "300", "--out", "/dev/null/tok"],
        ["/dev/null/tok: Not a directory"],
    ),
    "prepare: empty file": (
        lambda p: ["prepare", p.file("empty.txt", b""), "--tokenizer", "char", "--out", p.out("p")],
        ["empty.txt: the corpus is empty"],
    ),
    "prepare: Latin-1": (
        lambda p: ["prepare", p.file("latin.txt", LATIN1), "--tokenizer", "char", "--out", p.out("p")],
        ["latin.txt: not UTF-8 at byte 3"],
    ),
    "prepare: binary": (
        lambda p: ["prepare", p.file("bin.txt", BINARY), "--tokenizer", "char", "--out", p.out("p")],
        ["bin.txt: looks binary"],
    ),
    "prepare: ends inside a character": (
        lambda p: ["prepare", p.file("cut.txt", "caf\xe9".encode()[:-1]), "--tokenizer", "char", "--out", p.out("p")],
        ["cut.txt: ends inside a UTF-8 character"],
    ),
    "prepare: JSONL in Latin-1": (
        lambda p: [
            "prepare",
            p.file("latin.jsonl", b'{"text": "caf\xe9"}\n'),
            "--tokenizer",
            "char",
            "--out",
            p.out("p"),
        ],
        ["latin.jsonl:1: not UTF-8"],
    ),
    "prepare: JSON that is not JSON": (
        lambda p: ["prepare", p.file("bad.json", "{not json"), "--tokenizer", "char", "--out", p.out("p")],
        ["bad.json: cannot read it as JSON"],
    ),
    "prepare: parquet that is not parquet": (
        lambda p: ["prepare", p.file("t.parquet", b"PAR1 not really"), "--tokenizer", "char", "--out", p.out("p")],
        ["t.parquet: cannot read it as PARQUET"],
    ),
    "prepare: bpe tokenizer meta in Latin-1": (
        lambda p: [
            "prepare",
            str(p.made.text),
            "--tokenizer",
            "bpe:" + p.copy("bpe-ckpt", write("tokenizer/kiln_tokenizer.json", LATIN1)) + "/tokenizer",
            "--out",
            p.out("p"),
        ],
        ["kiln_tokenizer.json: not UTF-8 at byte 3"],
    ),
    "prepare: bpe tokenizer.json cut short": (
        lambda p: [
            "prepare",
            str(p.made.text),
            "--tokenizer",
            "bpe:" + p.copy("bpe-ckpt", cut("tokenizer/tokenizer.json", 100)) + "/tokenizer",
            "--out",
            p.out("p"),
        ],
        ["tokenizer.json: cannot load it"],
    ),
    "prepare: --out under a file": (
        lambda p: ["prepare", str(p.made.text), "--tokenizer", "char", "--out", "/dev/null/p"],
        ["/dev/null/p: Not a directory"],
    ),
    "train: prepared train.bin cut short": (
        lambda p: ["train", "--data", p.copy("prepared", cut("train.bin", 11)), *TRAIN, "--out", p.out("run")],
        ["train.bin: missing or not 3,240 bytes as meta.json says", "prepare the data again"],
    ),
    "train: prepared meta.json damaged": (
        lambda p: [
            "train",
            "--data",
            p.copy("prepared", write("meta.json", '{"kiln": ')),
            *TRAIN,
            "--out",
            p.out("run"),
        ],
        ["meta.json: not the meta.json of a Kiln prepared corpus", "prepare the data again"],
    ),
    "train: --config in Latin-1": (
        lambda p: [
            "train",
            "--data",
            str(p.made.prepared),
            "--config",
            p.file("c.toml", b'name = "caf\xe9"\n'),
            *TRAIN,
            "--out",
            p.out("run"),
        ],
        ["c.toml: not UTF-8"],
    ),
    "train: --out is a file": (
        lambda p: ["train", "--data", str(p.made.prepared), *TRAIN, "--out", p.file("run", "x")],
        ["run: is a file, where a folder should be"],
    ),
    "sample: config.json without the model": (
        lambda p: ["sample", p.copy("ckpt", edit_json("config.json", lambda c: {"kiln": "checkpoint"}))],
        ["config.json: its model settings cannot be read (no 'model')"],
    ),
    "sample: config.json with a word for a number": (
        lambda p: [
            "sample",
            p.copy("ckpt", edit_json("config.json", lambda c: {**c, "model": {**c["model"], "n_layer": "two"}})),
        ],
        ["config.json: its model settings cannot be read"],
    ),
    "sample: weights of another shape": (
        lambda p: ["sample", p.copy("ckpt", edit_json("config.json", other_shape))],
        ["model.safetensors: weights do not match config.json (size mismatch"],
    ),
    "sample: weights are a folder": (
        lambda p: ["sample", p.copy("ckpt", a_folder("model.safetensors"))],
        ["model.safetensors: is a folder, where a file should be"],
    ),
    "sample: tokenizer meta binary": (
        lambda p: ["sample", p.copy("ckpt", write("tokenizer/kiln_tokenizer.json", BINARY))],
        ["kiln_tokenizer.json: not UTF-8 at byte 128"],
    ),
    "sample: tokenizer meta a list": (
        lambda p: ["sample", p.copy("ckpt", write("tokenizer/kiln_tokenizer.json", "[1]"))],
        ["kiln_tokenizer.json: holds a list"],
    ),
    "sample: training_state.json damaged": (
        lambda p: ["sample", p.copy("ckpt", write("training_state.json", "{oops"))],
        ["training_state.json: cannot be read"],
    ),
    "sample: --max-new-tokens 0": (
        lambda p: ["sample", str(p.made.ckpt), "--max-new-tokens", "0"],
        ["--max-new-tokens 0 must be at least 1"],
    ),
    "sample: --num-samples 0": (
        lambda p: ["sample", str(p.made.ckpt), "--num-samples", "0"],
        ["--num-samples 0 must be at least 1"],
    ),
    "finetune: data in Latin-1": (
        lambda p: ["finetune", str(p.made.ckpt), "--data", p.file("latin.json", LATIN1), "--out", p.out("ft")],
        ["latin.json: not UTF-8 at byte 3"],
    ),
    "finetune: data binary": (
        lambda p: ["finetune", str(p.made.ckpt), "--data", p.file("bin.jsonl", BINARY), "--out", p.out("ft")],
        ["bin.jsonl: not UTF-8"],
    ),
    "finetune: data a folder": (
        lambda p: ["finetune", str(p.made.ckpt), "--data", p.folder("data"), "--out", p.out("ft")],
        ["data: is a folder"],
    ),
    "finetune: --lora-alpha 0": (
        lambda p: [
            "finetune",
            str(p.made.ckpt),
            "--data",
            str(p.made.instructions),
            "--lora-r",
            "2",
            "--lora-alpha",
            "0",
            "--out",
            p.out("ft"),
        ],
        ["--lora-alpha 0.0 must be above 0"],
    ),
    "merge: adapter weights missing": (
        lambda p: ["merge", p.copy("adapter", removed("adapter_model.safetensors")), "--out", p.out("m")],
        ["adapter_model.safetensors: is missing"],
    ),
    "merge: adapter_config.json damaged": (
        lambda p: ["merge", p.copy("adapter", write("adapter_config.json", "{oops")), "--out", p.out("m")],
        ["adapter_config.json: cannot be read"],
    ),
    "merge: config.json without the base's checksum": (
        lambda p: [
            "merge",
            p.copy("adapter", edit_json("config.json", lambda c: {**c, "base_sha256": None})),
            "--out",
            p.out("m"),
        ],
        ["config.json: does not record the adapter's base"],
    ),
    "merge: --out holds other files": (
        lambda p: ["merge", str(p.made.adapter), "--out", str(Path(p.file("mine/notes.txt", "x")).parent)],
        ["mine: already exists", "--force"],
    ),
    "chat: --max-new-tokens 0": (
        lambda p: ["chat", str(p.made.ckpt), "--max-new-tokens", "0"],
        ["--max-new-tokens 0 must be at least 1"],
    ),
    "evaluate: --stride 0": (
        lambda p: ["evaluate", str(p.made.ckpt), "--data", str(p.made.text), "--stride", "0"],
        ["--stride 0 must be at least 1"],
    ),
    "evaluate: --out a folder": (
        lambda p: ["evaluate", str(p.made.ckpt), "--data", str(p.made.text), "--out", p.folder("scores")],
        ["scores: Is a directory"],
    ),
    "evaluate: --out a device": (
        lambda p: ["evaluate", str(p.made.ckpt), "--data", str(p.made.text), "--out", p.device("full")],
        ["full: is a device, pipe or socket"],
    ),
    "export hf: OUT a device, --force": (
        lambda p: ["export", str(p.made.ckpt), "--to", "hf", p.device("full"), "--force"],
        ["full: is a device, pipe or socket"],
    ),
    "export hf: OUT under a file": (
        lambda p: ["export", str(p.made.ckpt), "--to", "hf", "/dev/null/x"],
        ["/dev/null/x: Not a directory"],
    ),
    "export gguf: no tokenizer": (
        lambda p: ["export", p.copy("bpe-ckpt", removed("tokenizer")), "--to", "gguf", p.out("x.gguf")],
        ["has no tokenizer/ folder"],
    ),
    "export gguf: OUT a device, --force": (
        lambda p: ["export", str(p.made.bpe_ckpt), "--to", "gguf", p.device("full"), "--force"],
        ["full: is a device, pipe or socket"],
    ),
    "serve: --port 70000": (lambda p: ["serve", str(p.made.ckpt), "--port", "70000"], ["give a port from 1 to 65535"]),
    "serve: --port in use": (
        lambda p: ["serve", str(p.made.ckpt), "--port", p.port_in_use()],
        ["cannot listen on 127.0.0.1:", "Address already in use", "choose another --port"],
    ),
    "serve: --host that does not resolve": (
        lambda p: ["serve", str(p.made.ckpt), "--host", "no such host!"],
        ["--host no such host!: not an address of this machine"],
    ),
    "serve: --runs missing": (
        lambda p: ["serve", str(p.made.ckpt), "--runs", str(p.root / "nope")],
        ["--runs", "nope: no such folder"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_is_one_line_naming_it(capsys, tmp_path, made, monkeypatch, case):
    build, fragments = BAD_INPUTS[case]
    place = Place(tmp_path, made, monkeypatch)
    code, _, err = run(capsys, *build(place))
    assert code == 2, err
    assert_one_line(code, err, *fragments)
    for out in place.outputs:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), out


def hf_copy(p: Place, damage) -> str:
    path = p.root / "hf"
    shutil.copytree(p.made.hf, path)
    damage(path)
    return str(path)


IMPORTS = {
    "import: config.json damaged": (
        lambda p: ["import", hf_copy(p, write("config.json", "{oops")), p.out("k")],
        ["config.json: cannot be read"],
    ),
    "import: weights cut short": (
        lambda p: ["import", hf_copy(p, cut("model.safetensors", 1000)), p.out("k")],
        ["hf: cannot load the model's weights", "fetch the model again"],
    ),
    "import: tokenizer.json damaged": (
        lambda p: ["import", hf_copy(p, write("tokenizer.json", "{oops")), p.out("k")],
        ["tokenizer.json: cannot read it"],
    ),
}


@pytest.mark.parametrize("case", IMPORTS)
def test_a_damaged_hugging_face_folder_is_one_line_naming_it(capsys, tmp_path, made, mirror, monkeypatch, case):
    build, fragments = IMPORTS[case]
    place = Place(tmp_path, SimpleNamespace(**vars(made), hf=mirror / "tiny-gpt2"), monkeypatch)
    code, _, err = run(capsys, *build(place))
    assert code == 2, err
    assert_one_line(code, err, *fragments)
    assert not any(out.exists() for out in place.outputs)


@pytest.fixture
def unwritable(tmp_path):
    """A read-only file system and a nearly full one (4 kB): tiny tmpfs mounts, so root needs them too."""
    places = {"read-only": tmp_path / "ro", "full": tmp_path / "full"}
    mounted = []
    try:
        for name, options in (("read-only", "ro,size=64k"), ("full", "size=4k")):
            places[name].mkdir()
            made = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "kiln-test", str(places[name])], capture_output=True
            )
            if made.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
            mounted.append(places[name])
        yield places
    finally:
        for folder in mounted:
            if subprocess.run(["umount", str(folder)]).returncode != 0:
                subprocess.run(["umount", "--lazy", str(folder)])
                pytest.fail(f"{folder}: still busy after the command: a file written there was left open")


def filled(folder: Path) -> Path:
    """Take the last free bytes, so that any write fails."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 512)
            f.flush()
    return folder


# id: (the command line, given a Place and the two places; fragments its one line holds)
UNWRITABLE = {
    "tokenizer train: --out read-only": (
        lambda p, u: [
            "tokenizer",
            "train",
            str(p.made.text),
            "--vocab-size",
            "300",
            "--out",
            p.out("t", u["read-only"]),
        ],
        ["Read-only file system"],
    ),
    "tokenizer train: disk full": (
        lambda p, u: ["tokenizer", "train", str(p.made.text), "--vocab-size", "300", "--out", p.out("t", u["full"])],
        ["t: No space left on device"],
    ),
    "prepare: --out read-only": (
        lambda p, u: ["prepare", str(p.made.text), "--tokenizer", "char", "--out", p.out("p", u["read-only"])],
        ["p: Read-only file system"],
    ),
    "prepare: disk full": (
        lambda p, u: ["prepare", str(p.made.text), "--tokenizer", "char", "--out", p.out("p", filled(u["full"]))],
        ["p: No space left on device"],
    ),
    "train: --out read-only": (
        lambda p, u: ["train", "--data", str(p.made.prepared), *TRAIN, "--out", p.out("run", u["read-only"])],
        ["run: Read-only file system"],
    ),
    "train: disk full at the checkpoint save": (
        lambda p, u: [
            "train",
            "--data",
            str(p.made.prepared),
            *TRAIN,
            "--set",
            "n_embd=32",
            "--out",
            p.run("run", u["full"]),
        ],
        ["run/last: could not write the checkpoint (No space left on device)", "continue with --resume"],
    ),
    "finetune: disk full at the checkpoint save": (
        lambda p, u: [
            "finetune",
            str(p.made.ckpt),
            "--data",
            str(p.made.instructions),
            "--max-iters",
            "1",
            "--out",
            p.run("ft", u["full"]),
        ],
        ["ft/last: could not write the checkpoint (No space left on device)", "continue with --resume"],
    ),
    "finetune: LoRA, disk full at the adapter save": (
        lambda p, u: [
            "finetune",
            str(p.made.ckpt),
            "--data",
            str(p.made.instructions),
            "--lora-r",
            "2",
            "--max-iters",
            "1",
            "--out",
            p.run("ft", u["full"]),
        ],
        ["ft/last: could not write the adapter (No space left on device)", "continue with --resume"],
    ),
    "merge: --out read-only": (
        lambda p, u: ["merge", str(p.made.adapter), "--out", p.out("m", u["read-only"])],
        ["m: could not write the checkpoint (Read-only file system)", "run the command again"],
    ),
    "merge: disk full": (
        lambda p, u: ["merge", str(p.made.adapter), "--out", p.out("m", u["full"])],
        ["m: could not write the checkpoint (No space left on device)", "run the command again"],
    ),
    "evaluate: --out read-only": (
        lambda p, u: [
            "evaluate",
            str(p.made.ckpt),
            "--data",
            str(p.made.text),
            "--out",
            p.out("s.jsonl", u["read-only"]),
        ],
        ["s.jsonl: Read-only file system"],
    ),
    "evaluate: disk full": (
        lambda p, u: [
            "evaluate",
            str(p.made.ckpt),
            "--data",
            str(p.made.text),
            "--out",
            p.out("s.jsonl", filled(u["full"])),
        ],
        ["s.jsonl: No space left on device"],
    ),
    "export hf: OUT read-only": (
        lambda p, u: ["export", str(p.made.ckpt), "--to", "hf", p.out("x", u["read-only"])],
        ["x: Read-only file system"],
    ),
    "export hf: disk full": (
        lambda p, u: ["export", str(p.made.ckpt), "--to", "hf", p.out("x", u["full"])],
        ["x: No space left on device"],
    ),
    "export gguf: OUT read-only": (
        lambda p, u: ["export", str(p.made.bpe_ckpt), "--to", "gguf", p.out("x.gguf", u["read-only"])],
        ["x.gguf: Read-only file system"],
    ),
    "export gguf: disk full": (
        lambda p, u: ["export", str(p.made.bpe_ckpt), "--to", "gguf", p.out("x.gguf", u["full"])],
        ["x.gguf: No space left on device"],
    ),
    "import: OUT read-only": (
        lambda p, u: ["import", str(p.made.hf), p.out("k", u["read-only"])],
        ["k: could not write the checkpoint (Read-only file system)"],
    ),
    "import: disk full": (
        lambda p, u: ["import", str(p.made.hf), p.out("k", u["full"])],
        ["k: could not write the checkpoint (No space left on device)"],
    ),
}


@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(
    capsys, tmp_path, made, monkeypatch, request, unwritable, case
):
    build, fragments = UNWRITABLE[case]
    hf = request.getfixturevalue("mirror") / "tiny-gpt2" if case.startswith("import") else None
    place = Place(tmp_path, SimpleNamespace(**vars(made), hf=hf), monkeypatch)
    code, _, err = run(capsys, *build(place, unwritable))
    assert code == 2, err
    assert_one_line(code, err, *fragments)
    for out in place.outputs:  # nothing a later run could take for whole, no temporary leftovers
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), sorted(out.parent.iterdir())


@pytest.mark.parametrize("command", [["prepare", "--tokenizer", "char"], ["tokenizer", "train", "--vocab-size", "300"]])
def test_a_huge_line_is_read_in_blocks(capsys, tmp_path, command):
    (tmp_path / "line.txt").write_text("word " * 400_000)  # 2 MB, no line end
    code, _, err = run(capsys, *command[:-2], str(tmp_path / "line.txt"), *command[-2:], "--out", str(tmp_path / "o"))
    assert code == 0, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode says")
def test_an_unreadable_input_is_one_line_naming_it(capsys, tmp_path, made):
    (tmp_path / "secret.txt").write_text("some text\n" * 10)
    (tmp_path / "secret.txt").chmod(0)
    code, _, err = run(
        capsys, "prepare", str(tmp_path / "secret.txt"), "--tokenizer", "char", "--out", str(tmp_path / "p")
    )
    assert_one_line(code, err, "secret.txt: Permission denied")
    assert code == 2 and not (tmp_path / "p").exists()


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(capsys, made, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9?\nhello\n" + BINARY[:200] + b"\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run(capsys, "chat", str(made.ckpt), "--max-new-tokens", "3", "--seed", "1")
    assert code == 0, err
    assert "not sent: this line is not UTF-8 text (byte 0xE9)" in out
    assert out.count("not sent: this line is not UTF-8") == 2  # the binary line too
    assert out.count("assistant> ") == 1  # "hello" was answered


@pytest.mark.parametrize(
    ("raised", "reason"),
    [
        (
            lambda path: ValueError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "No space left on device",
        ),
        (lambda path: OSError("4612 requested and 0 written"), "No space left on device"),
        (lambda path: OSError(errno.EROFS, os.strerror(errno.EROFS), str(path / "x")), "Read-only file system"),
    ],
    ids=["a Rust writer's error", "numpy's short write", "a temporary file's name"],
)
def test_a_failed_write_names_the_output_not_its_temporary_copy(tmp_path, raised, reason):
    """Without a tmpfs at hand: the failures Kiln's writers raise, and what an atomic write makes of them."""
    target = tmp_path / "out"
    with pytest.raises(OSError) as failure, atomic_dir(target) as tmp:
        (tmp / "part").write_text("half")
        raise raised(tmp)
    assert failure.value.filename == str(target) and failure.value.strerror == reason
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["serve", "x", "--port", "abc"], "argument --port: invalid int value: 'abc' (see kiln serve --help)"),
        (["train"], "the following arguments are required: --data, --out (see kiln train --help)"),
        (["frob"], "invalid choice: 'frob'"),
    ],
)
def test_a_mistyped_command_line_is_one_line_saying_where_to_look(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert_one_line(2, capsys.readouterr().err, fragment)


def test_the_metrics_log_is_cut_back_on_resume_by_swapping_in_a_whole_file(tmp_path, monkeypatch):
    from kiln.train import metrics

    log = tmp_path / metrics.METRICS_FILE
    log.write_text("".join(json.dumps({"step": step, "val_loss": 1.0}) + "\n" for step in (0, 10, 20)))
    before = log.read_text()

    def killed(self, text, *args, **kwargs):  # the process dies halfway through writing the cut log
        with open(self, "w") as f:
            f.write(text[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLog(tmp_path, step=10)
    monkeypatch.undo()
    assert log.read_text() == before and [p.name for p in tmp_path.iterdir()] == [metrics.METRICS_FILE]
    metrics.MetricsLog(tmp_path, step=10)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 10]
