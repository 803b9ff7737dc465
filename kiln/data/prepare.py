"""Text -> flat token files (train.bin, val.bin) + meta.json, streamed so memory stays bounded.

The split follows nanoGPT and LLMs-from-scratch: the corpus's first (1 - f) of characters is train and
the last f is val, each tokenized on its own. Data sets that ship a validation file use it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import kiln
from kiln.atomic import atomic_dir
from kiln.data.chunking import safe_chunks
from kiln.data.corpus import Corpus
from kiln.data.prepared import META_FILE, PREPARED_MARK, SPLITS, TOKENIZER_DIR, PreparedCorpus, is_prepared_dir
from kiln.data.tokenizers import EOS, CharTokenizer, Tokenizer, tokenizer_from_spec
from kiln.data.words import WordCounter
from kiln.errors import ConfigError, DataError
from kiln.progress import progress_bar

CHUNK_CHARS = 1 << 20  # text handed to the tokenizer at a time
BATCH_CHARS = 8 << 20  # text encoded in one parallel batch
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass
class CorpusStats:
    chars: int = 0
    documents: int = 0
    charset: set[str] = field(default_factory=set)


def scan(corpus: Corpus, collect_chars: bool) -> CorpusStats:
    """First pass: count characters and documents (and collect the character set for `char`)."""
    stats = CorpusStats()
    words = False
    with progress_bar(f"reading {corpus.label}", total=None, unit="chars") as advance:
        for document in corpus.documents():
            stats.documents += 1
            for text in document:
                stats.chars += len(text)
                words = words or not text.isspace()
                if collect_chars:
                    stats.charset.update(text)
                advance(len(text))
    if stats.chars == 0:
        raise DataError(f"{corpus.label}: the corpus is empty (no text found); give a file with some text in it")
    if not words:
        raise DataError(
            f"{corpus.label}: holds only whitespace ({stats.chars:,} characters, no word); give a file with text in it"
        )
    return stats


def _pieces(corpus: Corpus, split_at: int | None, default_split: str) -> Iterator[tuple[str, str, bool]]:
    """(split, text, starts_a_document) in corpus order, cut at character `split_at` into train/val."""
    position = 0
    for document in corpus.documents():
        starts = True
        for chunk in safe_chunks(document, CHUNK_CHARS):
            end = position + len(chunk)
            if split_at is None:
                yield default_split, chunk, starts
            elif position < split_at < end:
                yield "train", chunk[: split_at - position], starts
                yield "val", chunk[split_at - position :], False
            else:
                yield ("train" if end <= split_at else "val"), chunk, starts
            starts = False
            position = end


class _SplitWriter:
    """Appends token arrays to one split's .bin file; puts EOS between documents.

    `follows` is the split this one continues (val after train, cut from one corpus): when the cut falls
    between two documents, the EOS between them ends train and also opens val, so neither split loses
    the boundary.
    """

    def __init__(self, file, dtype: type, eos_id: int | None):
        self.file = file
        self.dtype, self.eos_id = dtype, eos_id
        self.tokens = self.chars = self.documents = 0
        self.follows: _SplitWriter | None = None

    def write(self, ids: np.ndarray, chars: int, starts_document: bool) -> None:
        if starts_document and self.documents:
            self.write_eos()
        elif starts_document and self.follows is not None and self.follows.documents:
            self.follows.write_eos()
            self.write_eos()
        # A split's first piece counts as a document even when it continues one cut in two, so the
        # next document still gets its EOS.
        if starts_document or not self.documents:
            self.documents += 1
        ids.astype(self.dtype, copy=False).tofile(self.file)
        self.tokens += len(ids)
        self.chars += chars

    def write_eos(self) -> None:
        if self.eos_id is not None:
            np.array([self.eos_id], dtype=self.dtype).tofile(self.file)
            self.tokens += 1

    def summary(self) -> dict:
        return {"tokens": self.tokens, "chars": self.chars, "documents": self.documents}


def prepare_corpus(
    corpora: dict[str, Corpus],
    tokenizer: str | Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    dtype: str = "auto",
    unk: bool = False,
    force: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> PreparedCorpus:
    """Tokenize `corpora` ({'all': c} or {'train': c, 'val': c}) into `out_dir`; returns the result.

    `tokenizer` is 'char' (built from this corpus), 'gpt2', 'bpe:DIR', or a Tokenizer. A folder already
    prepared from the same source with the same tokenizer and split is reused as it is.
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} must be at least 0 and below 1 (0.1 keeps 10% for val)")
    if dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype {dtype}: choose auto, uint16 or uint32")
    if out_dir.exists() and any(out_dir.iterdir()) and not is_prepared_dir(out_dir) and not force:
        raise DataError(f"{out_dir}: exists and is not a Kiln prepared corpus; choose another --out or pass --force")

    # Only a char vocabulary needs the corpus read first; other tokenizers can check for reuse before
    # any pass over the text.
    stats = None
    if tokenizer == "char":
        stats = {role: scan(corpus, collect_chars=True) for role, corpus in corpora.items()}
        charset = set().union(*(s.charset for s in stats.values()))
        several_documents = sum(s.documents for s in stats.values()) > 1
        tokenizer = CharTokenizer(charset, specials=[EOS] if several_documents else [], unk=unk)
    elif isinstance(tokenizer, str):
        tokenizer = tokenizer_from_spec(tokenizer, data_dir)
    token_dtype = _choose_dtype(dtype, tokenizer, out_dir)

    own_split = "all" not in corpora
    identity = {
        "source": {
            "label": ", ".join(c.label for c in corpora.values()),
            "sha256": {role: corpus.fingerprint() for role, corpus in corpora.items()},
        },
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint(),
            "eos_id": tokenizer.eos_id,
        },
        "dtype": np.dtype(token_dtype).name,
        "split": "the data set's own train and val files"
        if own_split
        else f"first {1 - val_fraction:.0%} of characters train, last {val_fraction:.0%} val",
        "val_fraction": None if own_split else val_fraction,
    }
    if is_prepared_dir(out_dir) and not force:
        existing = PreparedCorpus.open(out_dir)
        if _same_request(existing.meta, identity):
            return existing
        if existing.meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
            raise DataError(
                f"{out_dir}: holds data prepared with the {existing.meta['tokenizer']['kind']} tokenizer, "
                f"not {tokenizer.kind}; choose another --out or pass --force to replace it"
            )
    if stats is None:
        stats = {role: scan(corpus, collect_chars=False) for role, corpus in corpora.items()}

    total_chars = sum(s.chars for s in stats.values())
    label = identity["source"]["label"]
    words = WordCounter()  # of the train split: the words the model will read
    with atomic_dir(out_dir) as tmp:
        bar = progress_bar(f"tokenizing {label} ({tokenizer.kind})", total_chars, "chars")
        with ExitStack() as files, bar as advance:
            writers = {
                split: _SplitWriter(
                    files.enter_context(open(tmp / f"{split}.bin", "wb")), token_dtype, tokenizer.eos_id
                )
                for split in SPLITS
            }
            for role, corpus in corpora.items():
                split_at = int(stats[role].chars * (1 - val_fraction)) if role == "all" else None
                writers["val"].follows = writers["train"] if role == "all" else None
                _encode_into(_pieces(corpus, split_at, role), tokenizer, writers, advance, words)
        splits = {split: w.summary() for split, w in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise DataError(f"{label}: no training tokens after the split; lower --val-fraction")
        tokenizer.words = dict(words.counts)
        tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {
            "kiln": PREPARED_MARK,
            "format_version": 1,
            "created_by": f"kiln {kiln.__version__}",
            **identity,
            "splits": splits,
            "words": len(words.counts),
        }
        meta["source"]["skipped_lines"] = sum(c.skipped_lines for c in corpora.values())
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return PreparedCorpus.open(out_dir)


def _choose_dtype(dtype: str, tokenizer: Tokenizer, out_dir: Path) -> type:
    fits_16 = tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1
    if dtype == "auto":
        return np.uint16 if fits_16 else np.uint32
    if dtype == "uint16" and not fits_16:
        raise ConfigError(
            f"{out_dir}: a vocabulary of {tokenizer.vocab_size:,} tokens does not fit uint16 "
            "(at most 65,536); use --dtype uint32 or auto"
        )
    return DTYPES[dtype]


def _same_request(old: dict, new: dict) -> bool:
    """True when a prepared folder's meta shows the same source, tokenizer, split and dtype as `new`, and
    its words were counted (a folder from before words.txt is prepared again)."""

    def key(meta: dict) -> tuple:
        return (meta["source"]["sha256"], meta["tokenizer"]["fingerprint"], meta["dtype"], meta["val_fraction"])

    return key(old) == key(new) and "words" in old


def _encode_into(pieces, tokenizer: Tokenizer, writers: dict[str, _SplitWriter], advance, words: WordCounter) -> None:
    batch: list[tuple[str, str, bool]] = []
    size = 0

    def flush() -> None:
        arrays = tokenizer.encode_to_arrays([text for _, text, _ in batch])
        for (split, text, starts), ids in zip(batch, arrays, strict=True):
            writers[split].write(ids, len(text), starts)
            if split == "train":
                words.add(text)
        advance(size)

    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= BATCH_CHARS:
            flush()
            batch, size = [], 0
    if batch:
        flush()
