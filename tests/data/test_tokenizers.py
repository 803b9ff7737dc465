"""Every tokenizer round-trips text exactly, gives the published token counts, and saves/loads."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.data.tokenizers import EOS, BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_spec
from kiln.errors import TokenizerError

any_unicode = st.text(max_size=300)
property_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_gpt2_counts_the_verdict_as_llms_from_scratch_does(gpt2, verdict_text):
    assert len(verdict_text) == 20_479
    assert len(gpt2.encode(verdict_text)) == 5_145


def test_gpt2_known_ids_and_eos(gpt2):
    assert gpt2.encode("Hello, world. Is this-- a test?") == [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
    assert gpt2.vocab_size == 50_257
    assert gpt2.eos_id == 50_256
    assert gpt2.encode(f"end{EOS}") == [437, 50_256]


def test_gpt2_counts_tiny_shakespeare(gpt2, shakespeare_text):
    assert len(gpt2.encode(shakespeare_text)) == 338_025


@property_settings
@given(text=any_unicode)
def test_gpt2_round_trips_any_unicode(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@property_settings
@given(text=any_unicode)
def test_trained_bpe_round_trips_any_unicode(trained_bpe, text):
    assert trained_bpe.decode(trained_bpe.encode(text)) == text


def test_char_vocabulary_of_tiny_shakespeare(shakespeare_text):
    tokenizer = CharTokenizer(shakespeare_text)
    assert tokenizer.vocab_size == 65
    assert tokenizer.decode(tokenizer.encode(shakespeare_text)) == shakespeare_text
    # nanoGPT's stoi: sorted characters, so '\n' is 0 and ' ' is 1
    assert tokenizer.encode("\n !") == [0, 1, 2]


@given(text=st.text(min_size=1, max_size=200))
def test_char_round_trips_text_it_was_built_on(text):
    tokenizer = CharTokenizer(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_unknown_character_is_an_error_or_unk():
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at position 2"):
        CharTokenizer("abc").encode("abz")
    tokenizer = CharTokenizer("abc", unk=True)
    assert tokenizer.encode("abz") == [0, 1, tokenizer.unk_id]
    assert tokenizer.vocab_size == 4


def test_char_special_tokens_follow_the_characters():
    tokenizer = CharTokenizer("ab", specials=[EOS])
    assert tokenizer.eos_id == 2
    assert tokenizer.encode(f"a{EOS}b") == [0, 2, 1]
    assert tokenizer.decode([0, 2, 1]) == f"a{EOS}b"


def test_bpe_reserves_chat_special_tokens(trained_bpe):
    assert set(trained_bpe.special_tokens) == {EOS, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"}
    assert trained_bpe.vocab_size == 512
    assert trained_bpe.encode(EOS) == [trained_bpe.eos_id]


def test_bpe_training_on_tiny_shakespeare_at_4096_is_quick(shakespeare_text):
    import time

    start = time.perf_counter()
    tokenizer = BPETokenizer.train([shakespeare_text], vocab_size=4096)
    assert time.perf_counter() - start < 30
    assert tokenizer.vocab_size == 4096
    assert len(tokenizer.encode(shakespeare_text)) < len(shakespeare_text) / 2.5


def test_bpe_vocab_too_small_is_an_error():
    with pytest.raises(TokenizerError, match="at least 261"):
        BPETokenizer.train(["some text"], vocab_size=100)


@pytest.mark.parametrize("make", ["char", "gpt2", "bpe"])
def test_save_and_load_give_the_same_tokenizer(make, tmp_path, gpt2, trained_bpe, verdict_text):
    tokenizer = {"char": CharTokenizer(verdict_text, specials=[EOS]), "gpt2": gpt2, "bpe": trained_bpe}[make]
    loaded = load_tokenizer(tokenizer.save(tmp_path / make))
    assert loaded.kind == tokenizer.kind
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode(verdict_text) == tokenizer.encode(verdict_text)
    assert loaded.special_tokens == tokenizer.special_tokens


def test_batch_encoding_equals_one_by_one(gpt2, trained_bpe, verdict_text):
    texts = verdict_text.split("\n\n")[:20]
    for tokenizer in (gpt2, trained_bpe):
        assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
        assert [a.tolist() for a in tokenizer.encode_to_arrays(texts)] == [tokenizer.encode(t) for t in texts]


def test_tokenizer_specs(tmp_path, trained_bpe, mirror):
    assert tokenizer_from_spec("gpt2", mirror).kind == "gpt2"
    folder = trained_bpe.save(tmp_path / "bpe")
    assert tokenizer_from_spec(f"bpe:{folder}").fingerprint() == trained_bpe.fingerprint()
    with pytest.raises(TokenizerError, match="not a Kiln tokenizer folder"):
        tokenizer_from_spec(f"bpe:{tmp_path}")
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt3'"):
        tokenizer_from_spec("gpt3")


def test_gpt2_files_that_are_not_gpt2_are_refused(tmp_path, mirror):
    from kiln.data.tokenizers import GPT2Tokenizer

    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_bytes((mirror / "gpt2-tokenizer" / "vocab.bpe").read_bytes())
    with pytest.raises(TokenizerError, match="not GPT-2's encoder.json"):
        GPT2Tokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_bpe_corpus_encoding_of_long_text_equals_whole_encoding(trained_bpe, shakespeare_text):
    text = shakespeare_text[:400_000]  # several 128 KB pieces
    (array,) = trained_bpe.encode_to_arrays([text])
    assert array.tolist() == trained_bpe.encode(text)
