"""Fuzzing the tokenizers: any Unicode text round-trips, or the tokenizer says which character it cannot
read (a TokenizerError naming it), never another exception. Text normalisation (BOM, CRLF) belongs to
file reading, so the tokenizers keep both exactly and the text reader folds them."""

from __future__ import annotations

import re
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.data import corpus
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.data.tokenizers.char import UNK, UnknownCharacter
from kiln.errors import DataError, TokenizerError

# Text that is hard on tokenizers: special-token spellings, BOMs, line ends, NUL, joiners, combining
# marks, astral characters and the line separators that str.splitlines() also splits at.
TRICKY = [
    EOS,
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|pad|>",
    "<unk>",
    "<|",
    "|>",
    "\ufeff",
    "\r\n",
    "\r",
    "\n",
    "\x00",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\u200d",
    "e\u0301",
    "👩‍👩‍👧",
    "\U0010ffff",
    "𝔘",
    " ",
    "\t",
]
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def texts(surrogates: bool = False) -> st.SearchStrategy[str]:
    pieces = [st.text(max_size=20), st.sampled_from(TRICKY)]
    if surrogates:  # what a JSON "\ud800" escape without its other half gives
        pieces.append(st.characters(categories=["Cs"]))
    return st.lists(st.one_of(*pieces), max_size=12).map("".join)


def assert_names_the_character(error: TokenizerError, char: str) -> None:
    assert f"U+{ord(char):04X}" in str(error) and "\n" not in str(error)


@pytest.fixture(scope="module", params=["gpt2", "bpe"])
def byte_level(request, gpt2, trained_bpe):
    return {"gpt2": gpt2, "bpe": trained_bpe}[request.param]


@settings(max_examples=150)
@given(text=texts(surrogates=True))
@example(text="a\ud800b")  # a lone surrogate: bpe raised TypeError, gpt2 silently wrote U+FFFD
@example(text=f"\ufeffline\r\n{EOS}\u2028")
def test_byte_level_tokenizers_round_trip_any_text(byte_level, text):
    surrogate = LONE_SURROGATE.search(text)
    for encode in (byte_level.encode, byte_level.encode_plain, lambda t: byte_level.encode_batch([t])[0]):
        if surrogate:
            with pytest.raises(UnknownCharacter) as raised:
                encode(text)
            assert_names_the_character(raised.value, surrogate.group())
            assert raised.value.position == surrogate.start()
        else:
            assert byte_level.decode(encode(text)) == text
    if not surrogate:
        (array,) = byte_level.encode_to_arrays([text])
        assert array.tolist() == byte_level.encode(text)


@settings(max_examples=150)
@given(vocabulary=texts(), text=texts(surrogates=True), unk=st.booleans())
@example(vocabulary="ab", text="abz", unk=False)
@example(vocabulary="abc", text="a\ud800", unk=False)
def test_char_tokenizer_round_trips_or_names_the_unknown_character(vocabulary, text, unk):
    tokenizer = CharTokenizer(vocabulary, specials=[EOS], unk=unk)
    unknown = [(i, c) for i, c in enumerate(text) if c not in set(vocabulary)]
    if not unknown:
        assert tokenizer.decode(tokenizer.encode_plain(text)) == text
    elif unk:
        written = "".join(UNK if c not in set(vocabulary) else c for c in text)
        assert tokenizer.decode(tokenizer.encode_plain(text)) == written
    else:
        with pytest.raises(UnknownCharacter) as raised:
            tokenizer.encode_plain(text)
        position, char = unknown[0]
        assert (raised.value.char, raised.value.position) == (char, position)
        assert_names_the_character(raised.value, char)


@settings(max_examples=60)
@given(ids=st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=6))
@example(ids=[-1])
@example(ids=[2**40])
@example(ids=[50_257])
def test_decoding_any_ids_gives_text_or_a_tokenizer_error(gpt2, trained_bpe, ids):
    for tokenizer in (gpt2, trained_bpe, CharTokenizer("abc", specials=[EOS])):
        try:
            assert isinstance(tokenizer.decode(ids), str)
        except TokenizerError as e:
            assert "vocabulary" in str(e)


@settings(max_examples=100)
@given(
    text=texts(),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
    crlf=st.booleans(),
    block=st.integers(1, 9),
)
@example(text="a\nb", encoding="utf-8", crlf=True, block=2)  # a CRLF cut between two blocks
def test_text_files_lose_the_bom_and_crlf_but_keep_everything_else(tmp_path_factory, text, encoding, crlf, block):
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    raw = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes(raw.encode(encoding))
    # Small blocks put seams inside characters, BOMs and CRLFs.
    with mock.patch.object(corpus, "_BLOCK", block):
        try:
            (document,) = corpus.open_corpus(path)["all"].documents()
            read = "".join(document)
        except DataError as e:  # only for a NUL in UTF-8: the file looks binary
            assert "\x00" in text and encoding != "utf-16" and str(path) in str(e)
            return
    bom = encoding == "utf-8" and text.startswith("\ufeff")  # a second BOM is the text's own
    assert read == raw.replace("\r\n", "\n")[1 if bom else 0 :]


@settings(max_examples=40)
@given(text=texts())
def test_tokenizers_keep_the_bom_and_carriage_returns_as_text(gpt2, trained_bpe, text):
    text = "\ufeff" + text + "\r\n"
    for tokenizer in (gpt2, trained_bpe, CharTokenizer(text)):
        assert tokenizer.decode(tokenizer.encode_plain(text)) == text
