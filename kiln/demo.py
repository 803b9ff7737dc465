"""The main job behind `make demo`: get the default corpus, prepare it, train Kiln's best CPU preset on
it for a few minutes, show what the model writes, then teach it to answer instructions with LoRA and
hold a short scripted chat with it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.checkpoint import load_checkpoint
from kiln.data.corpus import open_corpus
from kiln.data.prepare import prepare_corpus
from kiln.errors import DataError, TokenizerError
from kiln.finetune.run import finetune_and_report
from kiln.generate.chat import ChatSession, run_script
from kiln.generate.sampling import SamplingConfig, print_stream, stream_text
from kiln.model.lora import LoraSettings
from kiln.train.run import format_duration, train_and_report

DEFAULT_CORPUS = "tinyshakespeare"
FALLBACK_CORPUS = "python-docs"


DEMO_PRESET = "shakespeare-cpu"
DEMO_PROMPTS = ("ROMEO:\n", "First Citizen:\nWe")
INSTRUCTIONS = "instruction-data"
# The pretrained context is 64 characters; RoPE lets fine-tuning stretch it to hold a whole Alpaca prompt.
FINETUNE_SETTINGS = {"block_size": 512}
DEMO_LORA = LoraSettings(r=8, alpha=16, dropout=0.05, targets="all")
CHAT_SCRIPT = (
    "Name three primary colors.",
    "What is the opposite of hot?",
    "/set temperature=0",
    "Translate 'thank you' into French.",
)


def run_demo(
    out: Path,
    data_dir: str | os.PathLike | None = None,
    seconds: float = 180.0,
    finetune_seconds: float = 120.0,
    run_name: str | None = None,
) -> None:
    """The main job, in three stages. The model goes to OUT/RUN_NAME (by default the preset and the
    time, so each demo keeps its own run)."""
    console = Console()
    console.rule("[bold]Kiln demo 1/3: from raw text to token files")
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

    console.rule(f"[bold]Kiln demo 2/3: train {DEMO_PRESET} on {corpus_name} for {format_duration(seconds)}")
    run_dir = out / (run_name or f"{DEMO_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}")
    best = train_and_report(prepared_char, DEMO_PRESET, {}, {"max_time": seconds}, run_dir)
    checkpoint = load_checkpoint(best)
    for number, prompt in enumerate(DEMO_PROMPTS):
        console.print(f"\n[bold]sample {number + 1}[/bold] (prompt {prompt!r}, temperature 0.8):")
        print(prompt, end="")
        config = SamplingConfig(max_new_tokens=300, temperature=0.8, top_k=200, seed=number)
        print_stream(stream_text(checkpoint.model, checkpoint.tokenizer, prompt, config))
    if finetune_seconds > 0:
        adapter = _finetune_and_chat(console, best, run_dir, data_dir, finetune_seconds)
        if adapter is not None:
            console.print("\n[bold]Talk to them:[/bold]", soft_wrap=True)
            print(f"kiln chat {adapter}")
    else:
        console.print("\n[bold]Talk to it:[/bold]", soft_wrap=True)
    print(f'kiln sample {best} --prompt "JULIET:" --max-new-tokens 500')


def _finetune_and_chat(console: Console, base: Path, run_dir: Path, data_dir, seconds: float) -> Path | None:
    """Stage 3: LoRA on the instruction set, then a scripted chat with the result."""
    console.rule(f"[bold]Kiln demo 3/3: LoRA fine-tuning on {INSTRUCTIONS} for {format_duration(seconds)}, then chat")
    try:
        adapter = finetune_and_report(
            base,
            INSTRUCTIONS,
            run_dir / "lora",
            {**FINETUNE_SETTINGS, "max_time": seconds},
            DEMO_LORA,
            data_dir=data_dir,
        )
    except DataError as e:
        console.print(f"[yellow]skipping fine-tuning: {e}")
        return None
    console.print("\n[bold]A scripted chat[/bold] (temperature 0.7, then greedy):")
    session = ChatSession.from_checkpoint(
        adapter, sampling=SamplingConfig(max_new_tokens=150, temperature=0.7, top_k=50, seed=0)
    )
    run_script(session, CHAT_SCRIPT)
    return adapter
