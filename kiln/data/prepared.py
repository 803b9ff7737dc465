"""A prepared corpus folder: train.bin / val.bin token files, meta.json, and the tokenizer that made them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from kiln.data.tokenizers import Tokenizer, load_tokenizer
from kiln.errors import DataError

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
PREPARED_MARK = "prepared-corpus"
SPLITS = ("train", "val")


def is_prepared_dir(folder: Path) -> bool:
    """True when `folder` has a meta.json written by `kiln prepare`."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text()).get("kiln") == PREPARED_MARK
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class PreparedCorpus:
    """Token files on disk, read through memory maps (no copy into RAM)."""

    folder: Path
    meta: dict

    @classmethod
    def open(cls, folder: str | os.PathLike, expect_tokenizer: Tokenizer | None = None) -> PreparedCorpus:
        """Open a prepared folder; with `expect_tokenizer`, refuse data made with another tokenizer."""
        folder = Path(folder)
        if not is_prepared_dir(folder):
            raise DataError(f"{folder}: not a Kiln prepared corpus (no Kiln {META_FILE}); make one with `kiln prepare`")
        corpus = cls(folder, json.loads((folder / META_FILE).read_text()))
        if expect_tokenizer is not None and expect_tokenizer.fingerprint() != corpus.meta["tokenizer"]["fingerprint"]:
            raise DataError(
                f"{folder}: was prepared with the {corpus.meta['tokenizer']['kind']} tokenizer, not the "
                f"{expect_tokenizer.kind} one asked for; prepare the data again with that tokenizer"
            )
        return corpus

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.folder / TOKENIZER_DIR)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memory map (an empty array for an empty split)."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}': use train or val")
        path = self.folder / f"{split}.bin"
        if self.meta["splits"][split]["tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)
        expected = self.meta["splits"][split]["tokens"] * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path}: missing or not {expected:,} bytes as meta.json says; prepare the data again")
        return np.memmap(path, dtype=self.dtype, mode="r")

    def summary(self) -> str:
        s = self.meta["splits"]
        return (
            f"{self.meta['source']['label']}: {self.meta['tokenizer']['kind']} tokenizer, "
            f"vocab {self.meta['tokenizer']['vocab_size']:,}, {self.meta['dtype']}; "
            f"train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens ({self.meta['split']})"
        )
