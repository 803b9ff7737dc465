"""The main job behind `make demo`: get the default corpus, prepare it with two tokenizers, show statistics."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.data.corpus import open_corpus
from kiln.data.prepare import prepare_corpus
from kiln.errors import DataError, TokenizerError

DEFAULT_CORPUS = "tinyshakespeare"
FALLBACK_CORPUS = "python-docs"


def run_demo(out: Path, data_dir: str | os.PathLike | None = None) -> None:
    console = Console()
    console.rule("[bold]Kiln demo: from raw text to token files")
    try:
        corpus_name, corpora = DEFAULT_CORPUS, open_corpus(DEFAULT_CORPUS, data_dir)
    except DataError:
        console.print(
            f"[yellow]Tiny Shakespeare could not be obtained (`kiln data get {DEFAULT_CORPUS}` says why); "
            f"using the built-in {FALLBACK_CORPUS} corpus instead.",
            soft_wrap=True,
        )
        corpus_name, corpora = FALLBACK_CORPUS, open_corpus(FALLBACK_CORPUS, data_dir)

    table = Table(
        "tokenizer",
        "vocab",
        "train",
        "val",
        "chars/token",
        "seconds",
        title=f"{corpus_name}: tokens in the first 90% (train) and last 10% (val)",
    )
    samples = {}
    for tokenizer in ("char", "gpt2"):
        start = time.perf_counter()
        try:
            prepared = prepare_corpus(corpora, tokenizer, out / f"{corpus_name}-{tokenizer}", data_dir=data_dir)
        except (DataError, TokenizerError) as e:
            console.print(f"[yellow]skipping the {tokenizer} tokenizer: {e}")
            continue
        seconds = time.perf_counter() - start
        splits = prepared.meta["splits"]
        chars = splits["train"]["chars"] + splits["val"]["chars"]
        tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
        table.add_row(
            tokenizer,
            f"{prepared.meta['tokenizer']['vocab_size']:,}",
            f"{splits['train']['tokens']:,}",
            f"{splits['val']['tokens']:,}",
            f"{chars / tokens:.2f}",
            f"{seconds:.1f}",
        )
        ids = prepared.tokens("val")[:24].tolist()
        samples[tokenizer] = [prepared.tokenizer.decode([i]) for i in ids]
    console.print(table)
    for tokenizer, pieces in samples.items():
        console.print(f"[bold]{tokenizer}[/bold] tokens at the start of val:", escape(repr(pieces)))
    console.print(f"\nPrepared corpora are in {out}/ (train.bin, val.bin, meta.json, tokenizer/).")
