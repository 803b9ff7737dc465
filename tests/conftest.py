"""Shared fixtures: the real data mirror (../shared/data or $KILN_DATA_DIR) and an isolated user cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_mirror() -> Path | None:
    chosen = os.environ.get("KILN_DATA_DIR")
    candidate = Path(chosen) if chosen else REPO.parent / "shared" / "data"
    return candidate if (candidate / "tinyshakespeare.txt").is_file() else None


os.environ.setdefault("KILN_QUIET", "1")  # session fixtures run before the per-test environment
MIRROR = _find_mirror()
needs_mirror = pytest.mark.skipif(
    MIRROR is None, reason="real data mirror not found: set KILN_DATA_DIR to a folder laid out like ../shared/data"
)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test gets its own empty user cache, no progress bars, and the real mirror if there is one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("KILN_QUIET", "1")
    if MIRROR is not None:
        monkeypatch.setenv("KILN_DATA_DIR", str(MIRROR))
    else:
        monkeypatch.delenv("KILN_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def mirror() -> Path:
    if MIRROR is None:
        pytest.skip("real data mirror not found")
    return MIRROR


@pytest.fixture(scope="session")
def verdict_text(mirror) -> str:
    return (mirror / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_text(mirror) -> str:
    return (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2(mirror):
    from kiln.data.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer.resolve(mirror)


@pytest.fixture(scope="session")
def trained_bpe(mirror, tmp_path_factory):
    """A small byte-level BPE trained on The Verdict, saved and loaded back as users would."""
    from kiln.data.tokenizers import BPETokenizer, load_tokenizer

    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    folder = BPETokenizer.train([text], vocab_size=512).save(tmp_path_factory.mktemp("bpe"))
    return load_tokenizer(folder)


@pytest.fixture(scope="session")
def shakespeare_prepared(mirror, tmp_path_factory):
    """Tiny Shakespeare prepared with char and gpt2, as `kiln prepare tinyshakespeare` does."""
    from kiln.data.corpus import open_corpus
    from kiln.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prepared")
    return {
        tok: prepare_corpus(open_corpus("tinyshakespeare", mirror), tok, out / tok, data_dir=mirror)
        for tok in ("char", "gpt2")
    }
