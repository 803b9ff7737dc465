"""The main job behind `make demo`: get the default corpus, prepare it, train Kiln's best CPU preset on
it for a few minutes, and show what the model writes."""

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
from kiln.generate.sampling import SamplingConfig, print_stream, stream_text
from kiln.train.checkpoint import load_checkpoint
from kiln.train.run import format_duration, train_and_report

DEFAULT_CORPUS = "tinyshakespeare"
FALLBACK_CORPUS = "python-docs"


DEMO_PRESET = "shakespeare-cpu"
DEMO_PROMPTS = ("ROMEO:\n", "First Citizen:\nWe")


def run_demo(out: Path, data_dir: str | os.PathLike | None = None, seconds: float = 180.0) -> None:
    console = Console()
    console.rule("[bold]Kiln demo 1/2: from raw text to token files")
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
    samples, prepared_char = {}, None
    for tokenizer in ("char", "gpt2"):
        start = time.perf_counter()
        try:
            prepared = prepare_corpus(corpora, tokenizer, out / f"{corpus_name}-{tokenizer}", data_dir=data_dir)
        except (DataError, TokenizerError) as e:
            console.print(f"[yellow]skipping the {tokenizer} tokenizer: {e}")
            continue
        took = time.perf_counter() - start
        prepared_char = prepared if tokenizer == "char" else prepared_char
        splits = prepared.meta["splits"]
        chars = splits["train"]["chars"] + splits["val"]["chars"]
        tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
        table.add_row(
            tokenizer,
            f"{prepared.meta['tokenizer']['vocab_size']:,}",
            f"{splits['train']['tokens']:,}",
            f"{splits['val']['tokens']:,}",
            f"{chars / tokens:.2f}",
            f"{took:.1f}",
        )
        ids = prepared.tokens("val")[:24].tolist()
        samples[tokenizer] = [prepared.tokenizer.decode([i]) for i in ids]
    console.print(table)
    for tokenizer, pieces in samples.items():
        console.print(f"[bold]{tokenizer}[/bold] tokens at the start of val:", escape(repr(pieces)))
    console.print(f"\nPrepared corpora are in {out}/ (train.bin, val.bin, meta.json, tokenizer/).")
    if prepared_char is None:
        return

    console.rule(f"[bold]Kiln demo 2/2: train {DEMO_PRESET} on {corpus_name} for {format_duration(seconds)}")
    run_dir = out / f"{DEMO_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}"
    best = train_and_report(prepared_char, DEMO_PRESET, {}, {"max_time": seconds}, run_dir)
    checkpoint = load_checkpoint(best)
    for number, prompt in enumerate(DEMO_PROMPTS):
        console.print(f"\n[bold]sample {number + 1}[/bold] (prompt {prompt!r}, temperature 0.8):")
        print(prompt, end="")
        config = SamplingConfig(max_new_tokens=300, temperature=0.8, top_k=200, seed=number)
        print_stream(stream_text(checkpoint.model, checkpoint.tokenizer, prompt, config))
    console.print("\n[bold]Talk to it:[/bold]", soft_wrap=True)
    print(f'kiln sample {best} --prompt "JULIET:" --max-new-tokens 500')
