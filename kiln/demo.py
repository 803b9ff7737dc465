"""The main job behind `make demo`: turn English text into tokens with a tokenizer trained on it, pretrain
the demo's preset on it for a few minutes, show what the model writes, then fine-tune it on instructions,
hold a short scripted chat with it, and score it on held-out questions before and after fine-tuning."""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.data.corpus import Corpus, Documents, open_corpus
from kiln.data.fetch import resolve_dataset
from kiln.data.instructions import load_instructions
from kiln.data.prepare import prepare_corpus
from kiln.data.prepared import PreparedCorpus
from kiln.data.registry import get_dataset
from kiln.data.templates import get_template
from kiln.data.tokenizers import BPETokenizer
from kiln.errors import DataError
from kiln.evaluate.run import evaluate
from kiln.finetune.run import finetune_and_report
from kiln.finetune.sft import FinetuneConfig
from kiln.generate.chat import CHAT_SAMPLING as CHAT_DEFAULTS
from kiln.generate.chat import ChatSession, run_script
from kiln.generate.sampling import SamplingConfig, print_stream, stream_text
from kiln.train.run import format_duration, train_and_report

DEFAULT_CORPUS = "wikitext-2"
FALLBACK_CORPUS = "python-docs"
DEMO_PRESET = "chatbot-cpu"
BPE_VOCAB = 4096
INSTRUCTIONS = "instruction-data"
# Instruction data's train split, written out in the Alpaca template, joins pretraining as plain text (as
# nanochat's mid-training does): the model meets the shape of a question and its answer before fine-tuning.
# Its val and test splits never do.
INSTRUCTION_REPEATS = 3
DEMO_PROMPTS = ("The history of the city", "The opposite of hot is")
SAMPLE_TOKENS = 120
TEMPLATE = "alpaca"
# Full fine-tuning at the pretrained context (256 tokens hold every example), in two stages of equal time,
# the second starting from the first. First each training example 3 times beside 8 word-swapped copies of
# it (kiln/finetune/augment.py): with the preset's smeared keys the copies teach the model to answer with
# the question's own words (their other words, the original's facts put to the wrong words, carry no loss).
# Then the examples alone, about seven passes, kept at the last step: the model learns their facts by heart
# (its val loss rises a little as it does, the held-out ROUGE-L holds) and gives them when asked in other
# words (docs/finetune.md).
FINETUNE_STAGES: tuple[tuple[str, float, dict], ...] = (
    ("sft-copying", 0.5, {"word_swaps": 8, "original_copies": 3}),
    ("sft", 0.5, {"keep": "last"}),
)
CHAT_SAMPLING = SamplingConfig(**{**CHAT_DEFAULTS, "max_new_tokens": 150}, seed=0)  # `kiln chat`'s, shorter
# Things the training examples teach, asked in other words than theirs ("List three primary colors.", "What is
# the plural form of 'child'?", "What is the capital of France?"): a model this small knows little beyond
# them (docs/finetune.md). It was fine-tuned on single questions, and a model this small that can copy words
# copies them from earlier turns too, so each question starts a fresh conversation (/reset), as the tip says.
CHAT_SCRIPT = (
    "Name three primary colors.",
    "/reset",
    "What is the plural of 'child'?",
    "/reset",
    "/set temperature=0",
    "What is the capital city of France?",
)
HELD_OUT_TOKENS = 100  # the longest test answer is 50 tokens; a model that never stops is cut here


def run_demo(
    out: Path,
    data_dir: str | os.PathLike | None = None,
    seconds: float = 200.0,
    finetune_seconds: float = 140.0,
    run_name: str | None = None,
) -> None:
    """The main job, in three stages. The model goes to OUT/RUN_NAME (by default the preset and the
    time, so each demo keeps its own run)."""
    console = Console()
    console.rule("[bold]Kiln demo 1/3: from raw text to token files")
    corpus_name, prepared = demo_corpus(out, data_dir, console)

    console.rule(f"[bold]Kiln demo 2/3: train {DEMO_PRESET} on {corpus_name} for {format_duration(seconds)}")
    run_dir = out / (run_name or f"{DEMO_PRESET}-{time.strftime('%Y%m%d-%H%M%S')}")
    best = pretrain(prepared, seconds, run_dir)
    checkpoint = load_checkpoint(best)
    for number, prompt in enumerate(DEMO_PROMPTS):
        console.print(f"\n[bold]sample {number + 1}[/bold] (prompt {prompt!r}, temperature 0.8):")
        print(prompt, end="")
        config = SamplingConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=200, seed=number)
        print_stream(stream_text(checkpoint.model, checkpoint.tokenizer, prompt, config))
    tuned = _finetune_and_chat(console, best, run_dir, data_dir, finetune_seconds) if finetune_seconds > 0 else None
    if tuned is not None:
        console.print(
            "\n[bold]Talk to them[/bold] (the chatbot learnt single questions: /reset before each new one):",
            soft_wrap=True,
        )
        print(f"kiln chat {tuned}")
    else:
        console.print("\n[bold]Talk to it:[/bold]", soft_wrap=True)
    print(f'kiln sample {best} --prompt "{DEMO_PROMPTS[0]}" --max-new-tokens 300')


@dataclass
class TextDocuments(Corpus):
    """Documents held in memory, one string each (the demo's cleaned, mixed text)."""

    texts: list[str] = field(default_factory=list)

    def documents(self) -> Documents:
        return (iter((text,)) for text in self.texts)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode() + b"\0")
        return digest.hexdigest()


def demo_corpus(
    out: Path, data_dir: str | os.PathLike | None, console: Console | None = None
) -> tuple[str, PreparedCorpus]:
    """Stage 1: WikiText-2's articles (or, offline, the built-in Python docs) with the instruction train
    split mixed in, a byte-level BPE trained on that text, and the text prepared with it into OUT."""
    console = console or Console()
    try:
        corpus_name, train, val = DEFAULT_CORPUS, *wikitext_paragraphs(data_dir)
    except DataError:
        console.print(
            f"[yellow]WikiText-2 could not be obtained (`kiln data get {DEFAULT_CORPUS}` says why); "
            f"using the built-in {FALLBACK_CORPUS} corpus instead.",
            soft_wrap=True,
        )
        docs = ["".join(d) for d in open_corpus(FALLBACK_CORPUS)["all"].documents()]
        cut = len(docs) * 9 // 10
        corpus_name, train, val = FALLBACK_CORPUS, docs[:cut], docs[cut:]
    try:
        examples = instruction_texts(data_dir)
    except DataError as e:
        console.print(f"[yellow]pretraining without instructions mixed in: {e}")
        examples = []
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(train + examples, BPE_VOCAB)
    trained_in = time.perf_counter() - start
    mixed = train + examples * INSTRUCTION_REPEATS
    random.Random(0).shuffle(mixed)
    label = corpus_name + (f" + {INSTRUCTIONS} train x{INSTRUCTION_REPEATS}" if examples else "")
    corpora = {
        "train": TextDocuments(label=label, texts=mixed),
        "val": TextDocuments(label=f"{corpus_name} val", texts=val),
    }
    start = time.perf_counter()
    prepared = prepare_corpus(corpora, tokenizer, out / f"{corpus_name}-bpe{BPE_VOCAB}", data_dir=data_dir)
    prepared_in = time.perf_counter() - start

    splits = prepared.meta["splits"]
    table = Table("", "documents", "characters", "tokens", "chars/token", title=f"{label}, BPE {BPE_VOCAB:,}")
    for split in ("train", "val"):
        s = splits[split]
        table.add_row(
            split, f"{s['documents']:,}", f"{s['chars']:,}", f"{s['tokens']:,}", f"{s['chars'] / s['tokens']:.2f}"
        )
    console.print(table)
    console.print(f"BPE trained in {trained_in:.1f} s, text tokenized in {prepared_in:.1f} s.")
    ids = prepared.tokens("val")[:24].tolist()
    console.print("tokens at the start of val:", escape(repr([tokenizer.decode([i]) for i in ids])))
    console.print(f"Prepared corpus: {prepared.folder}/ (train.bin, val.bin, meta.json, tokenizer/).")
    return corpus_name, prepared


def wikitext_paragraphs(data_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """WikiText-2's train and val paragraphs as ordinary English: no headings, no sentence with an
    `<unk>` in it, and its tokenized spacing (" @-@ ", " , ") undone."""
    paths = resolve_dataset(get_dataset(DEFAULT_CORPUS), data_dir)
    return tuple(_paragraphs(paths[split].read_text(encoding="utf-8")) for split in ("train", "val"))


def _paragraphs(text: str) -> list[str]:
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        sentences = [s for s in re.split(r"(?<= \.) ", line) if "<unk>" not in s]
        if sentences:
            kept.append(_detokenize(" ".join(sentences)))
    return kept


def _detokenize(text: str) -> str:
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)\]%])", r"\1", text)
    text = re.sub(r"([(\[$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    return re.sub(r'" (.*?) "', r'"\1"', text)


def instruction_texts(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The instruction data's train split (the split fine-tuning makes), each example in the template."""
    template = get_template(TEMPLATE)
    train = load_instructions(INSTRUCTIONS, data_dir).split(seed=FinetuneConfig().split_seed)["train"]
    return ["".join(piece.text for piece in template.render(c.messages)) for c in train]


def pretrain(prepared: PreparedCorpus, seconds: float, run_dir: Path) -> Path:
    """Stage 2: the demo preset on the prepared corpus for `seconds`; returns the best checkpoint."""
    return train_and_report(prepared, DEMO_PRESET, {}, {"max_time": seconds}, run_dir)


def finetune(base: Path, run_dir: Path, seconds: float, data_dir: str | os.PathLike | None = None) -> Path:
    """Stage 3: full fine-tuning on the instruction data for `seconds`, in FINETUNE_STAGES, each starting
    from the one before; returns the last stage's kept checkpoint."""
    for folder, share, stage_settings in FINETUNE_STAGES:
        settings = {**stage_settings, "template": TEMPLATE, "max_time": seconds * share}
        base = finetune_and_report(base, INSTRUCTIONS, run_dir / folder, settings, data_dir=data_dir)
    return base


def held_out_scores(base: Path, tuned: Path, data_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """ROUGE-L, exact match and answer loss on the test split, for the base prompted in the same template
    (before) and the fine-tuned model (after)."""
    checkpoint = load_checkpoint(base)
    info = {"template": TEMPLATE, "finetune": {"data": INSTRUCTIONS, "split_seed": FinetuneConfig().split_seed}}
    before = save_checkpoint(
        tuned.parent.parent / "before-finetuning", checkpoint.model, checkpoint.tokenizer, info=info
    )
    return {
        name: evaluate(path, INSTRUCTIONS, data_dir, max_new_tokens=HELD_OUT_TOKENS, show=False)
        for name, path in (("before", before), ("after", tuned))
    }


def scores_table(scores: dict[str, dict], title: str) -> Table:
    table = Table("", "ROUGE-L", "exact match", "answer loss", title=title)
    for name, result in scores.items():
        table.add_row(
            f"{name} fine-tuning",
            f"{result['rouge_l']:.3f}",
            f"{result['exact_match']:.1%}",
            f"{result['answer_loss']:.3f}",
        )
    return table


def _finetune_and_chat(console: Console, base: Path, run_dir: Path, data_dir, seconds: float) -> Path | None:
    """Stage 3: full fine-tuning on the instruction set, a scripted chat, then the held-out scores."""
    console.rule(f"[bold]Kiln demo 3/3: fine-tuning on {INSTRUCTIONS} for {format_duration(seconds)}, then chat")
    try:
        tuned = finetune(base, run_dir, seconds, data_dir)
    except DataError as e:
        console.print(f"[yellow]skipping fine-tuning: {e}")
        return None
    console.print("\n[bold]A scripted chat[/bold] (`kiln chat`'s sampling, then greedy):")
    run_script(ChatSession.from_checkpoint(tuned, sampling=CHAT_SAMPLING), CHAT_SCRIPT)
    console.print(f"\nScoring greedy answers to the {INSTRUCTIONS} test split, which nothing trained on ...")
    scores = held_out_scores(base, tuned, data_dir)
    console.print(scores_table(scores, f"{scores['after']['examples']} held-out questions"))
    return tuned
