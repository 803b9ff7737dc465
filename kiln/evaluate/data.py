"""What to evaluate on: whether DATA is instruction records or running text, and which part of it.

Splits match training's. Running text that was prepared (DATA is a `kiln prepare` folder, or the text of
one the checkpoint trained on or the user cache holds) is scored on that folder's own split, the very
tokens training held out; other text keeps its own val file when the data set ships one, else its last
10% of characters, cut as `kiln prepare` cuts it. Instruction data is split as `kiln finetune` splits it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kiln.data.corpus import Corpus, ReadOptions, open_corpus
from kiln.data.fetch import cache_dir
from kiln.data.instructions import Conversation, InstructionData, detect_format
from kiln.data.preferences import is_preference_record
from kiln.data.prepare import scan
from kiln.data.prepared import PreparedCorpus, is_prepared_dir
from kiln.data.registry import DATASETS
from kiln.data.tokenizers import Tokenizer
from kiln.errors import ConfigError, DataError

INSTRUCTION_SPLITS = ("test", "val", "train", "all")
CORPUS_SPLITS = ("val", "train", "all")
DEFAULT_SPLIT_SEED = 123  # kiln finetune's default
DEFAULT_VAL_FRACTION = 0.1  # kiln prepare's default


def data_name(spec: str | os.PathLike) -> str:
    """A short name for DATA in file names: the data set's name, or the file's name without suffix."""
    return str(spec) if str(spec) in DATASETS else Path(spec).stem or "data"


def is_instruction_data(spec: str | os.PathLike, text_field: str | None = None) -> bool:
    """True for an instruction data set's name, or a .json/.jsonl file whose first record is in an
    instruction format; a text field to read makes any records running text."""
    if text_field:
        return False
    if str(spec) in DATASETS and not Path(spec).exists():
        return DATASETS[str(spec)].format == "instructions"
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        return False
    record = _first_record(path)
    if not isinstance(record, dict):
        return False
    try:
        detect_format(record, f"{path} (first record)")
    except DataError as e:
        if "text" in record:
            return False  # JSONL of {"text": ...}: running text
        raise DataError(f"{e}; or, for running text, name its field with --text-field") from None
    return True


def is_preference_data(spec: str | os.PathLike, text_field: str | None = None) -> bool:
    """True for a preference data set's name, or a .json/.jsonl file whose first record has `chosen` and
    `rejected` answers (such records may be instructions too: as pairs they are scored as pairs)."""
    if text_field:
        return False
    if str(spec) in DATASETS and not Path(spec).exists():
        return DATASETS[str(spec)].format == "preferences"
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
        return False
    return is_preference_record(_first_record(path))


def _first_record(path: Path) -> object:
    """The first record of a JSON array or JSONL file; None when it is not JSON (the text reader will
    say what is wrong with it)."""
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), None)
            if line is None:
                raise DataError(f"{path}: is empty; give a file with at least one record")
            return json.loads(line)
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: is empty; give a file with at least one record")
        records = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return records[0] if isinstance(records, list) and records else records


def instruction_split(data: InstructionData, split: str, seed: int = DEFAULT_SPLIT_SEED) -> list[Conversation]:
    """The conversations of `split` (test, val, train, or all), split with `seed` as fine-tuning did."""
    if split not in INSTRUCTION_SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(INSTRUCTION_SPLITS)} for instruction data")
    conversations = data.conversations if split == "all" else data.split(seed=seed)[split]
    if not conversations:
        raise DataError(
            f"{data.source}: the {split} split of {len(data.conversations):,} records is empty; "
            "use --split all, or more records"
        )
    return conversations


def corpus_split(
    spec: str | os.PathLike,
    split: str = "val",
    data_dir: str | os.PathLike | None = None,
    text_field: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    limit_chars: int | None = None,
) -> list[str]:
    """The documents of a corpus's `split` (val, train or all) as texts, at most `limit_chars` characters
    in all. Val is the data set's own val file, or else the last `val_fraction` of the characters."""
    if split not in CORPUS_SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(CORPUS_SPLITS)} for running text")
    corpora = open_corpus(spec, data_dir, ReadOptions(text_field=text_field))
    if "all" not in corpora:  # the data set's own train and val files
        parts = [corpora[role] for role in (("train", "val") if split == "all" else (split,))]
        documents = [d for corpus in parts for d in _characters(corpus, 0, None, limit_chars)]
        label = corpora["val"].label
    else:
        corpus = corpora["all"]
        label = corpus.label
        start, end = 0, None
        if split != "all":
            split_at = int(scan(corpus, collect_chars=False).chars * (1 - val_fraction))
            start, end = (split_at, None) if split == "val" else (0, split_at)
        documents = list(_characters(corpus, start, end, limit_chars))
    if limit_chars is not None:
        documents = _first_chars(documents, limit_chars)
    if not documents:
        raise DataError(f"{label}: its {split} part is empty; use --split all or a longer text")
    return documents


def _characters(corpus: Corpus, start: int, end: int | None, limit: int | None) -> Iterator[str]:
    """Each document's text between corpus character positions `start` and `end` (documents with none
    left out), stopping once `limit` characters are collected."""
    position = taken = 0
    for document in corpus.documents():
        kept = []
        for chunk in document:
            lo, hi = max(start - position, 0), len(chunk) if end is None else min(end - position, len(chunk))
            if lo < hi:
                kept.append(chunk[lo:hi])
                taken += hi - lo
            position += len(chunk)
            if (end is not None and position >= end) or (limit is not None and taken >= limit):
                break
        if kept:
            yield "".join(kept)
        if (end is not None and position >= end) or (limit is not None and taken >= limit):
            return


def _first_chars(documents: list[str], limit: int) -> list[str]:
    kept, left = [], limit
    for document in documents:
        if left <= 0:
            break
        kept.append(document[:left])
        left -= len(document)
    return kept


def find_prepared(
    spec: str | os.PathLike,
    tokenizer: Tokenizer,
    trained_on: Sequence[str | os.PathLike] = (),
    data_dir: str | os.PathLike | None = None,
    text_field: str | None = None,
) -> PreparedCorpus | None:
    """The prepared corpus DATA stands for: DATA itself when it is a prepared folder (whose ids `tokenizer`
    must read), else a folder prepared from the same text (same checksums), from `trained_on` (the folders
    the checkpoint trained on) or the user cache, one whose ids `tokenizer` reads first; None if none."""
    if is_prepared_dir(Path(spec)):
        corpus = PreparedCorpus.open(spec)
        if not reads_ids_of(tokenizer, corpus.tokenizer):
            raise DataError(
                f"{spec}: was prepared with a {corpus.tokenizer.kind} tokenizer of {corpus.tokenizer.vocab_size:,} "
                f"tokens that this checkpoint's ({tokenizer.describe()}) does not read; give the text it was "
                "prepared from as --data"
            )
        return corpus
    cache = cache_dir() / "prepared"
    cached = sorted(cache.iterdir(), key=lambda f: f.stat().st_mtime, reverse=True) if cache.is_dir() else []
    folders = [Path(f) for f in [*trained_on, *cached] if is_prepared_dir(Path(f))]
    if not folders:
        return None
    corpora = open_corpus(spec, data_dir, ReadOptions(text_field=text_field))
    source = {role: corpus.fingerprint() for role, corpus in corpora.items()}
    same_text = [c for c in map(PreparedCorpus.open, folders) if c.meta["source"]["sha256"] == source]
    same_text.sort(key=lambda c: not reads_ids_of(tokenizer, c.tokenizer))
    return same_text[0] if same_text else None


def reads_ids_of(tokenizer: Tokenizer, made_with: Tokenizer) -> bool:
    """True when `tokenizer` reads every id of `made_with` as the same text: the same tokenizer, or one
    grown from it (fine-tuning adds tokens after the ids the model already knows)."""
    if tokenizer.fingerprint() == made_with.fingerprint():
        return True
    return tokenizer.vocab_size >= made_with.vocab_size and all(
        tokenizer.decode([i]) == made_with.decode([i]) for i in range(made_with.vocab_size)
    )


def prepared_split(corpus: PreparedCorpus, split: str = "val", limit_chars: int | None = None) -> np.ndarray:
    """The tokens of a prepared corpus's `split` (val, train or all), at most `limit_chars` characters,
    after one token of context: an EOS for "start of text" where the split opens a document, else the
    token val opens with (its own context lies in train)."""
    if split not in CORPUS_SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(CORPUS_SPLITS)} for running text")
    eos = corpus.meta["tokenizer"]["eos_id"]
    train, val = corpus.tokens("train"), corpus.tokens("val")
    if split == "all" and len(train) and len(val) and train[-1] == val[0] == eos:
        val = val[1:]  # a cut between two documents wrote their EOS on both sides
    tokens = {"train": train, "val": val, "all": np.concatenate([train, val])}[split]
    if limit_chars is not None:
        tokens = _first_token_chars(tokens, corpus.tokenizer, eos, limit_chars)
    # val cut from one text opens with the EOS of a cut between documents, or inside a document
    opens_document = split != "val" or corpus.meta["val_fraction"] is None
    if eos is not None and opens_document and (not len(tokens) or tokens[0] != eos):
        tokens = np.concatenate([np.array([eos], dtype=tokens.dtype), tokens])
    if len(tokens) < 2:
        raise DataError(f"{corpus.folder}: its {split} split is empty; use --split all, or prepare a larger val split")
    return tokens


def _first_token_chars(tokens: np.ndarray, tokenizer: Tokenizer, eos: int | None, limit: int) -> np.ndarray:
    """The first tokens, as many as spell at most `limit` characters (EOS spells none)."""
    lengths: dict[int, int] = {}
    taken = 0
    for n in range(len(tokens)):
        token = int(tokens[n])
        if token != eos:
            if token not in lengths:
                lengths[token] = len(tokenizer.decode([token]))
            taken += lengths[token]
        if taken > limit:
            return tokens[:n]
    return tokens
