"""The `kiln` command. Each subcommand parses its arguments and makes one call into the package."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

import kiln
from kiln.errors import ConfigError, DataError, KilnError, TrainingStopped
from kiln.generate.chat_defaults import CHAT_SAMPLING

EXIT_USER_ERROR = 2


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", help="field holding the text in JSON/JSONL/CSV/parquet records (default: text)")
    p.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="on bytes that are not UTF-8: stop with an error (strict) or replace them",
    )
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines and count them")
    _add_one_per_line(p)


def _add_one_per_line(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--one-per-line",
        action="store_true",
        help="text files hold one example per line: each line is its own document, EOS between them",
    )


def _add_decoding_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="weights for decoding: auto (default: fp16 on x86 CPUs for models too big for the caches, bf16 "
        "for 8 or more samples at once on CPUs with bf16 arithmetic, else fp32), fp32 (exact), fp16 (half "
        "the bytes, fp32 arithmetic: about 2x faster; greedy text may part "
        "from fp32's where two tokens nearly tie), bf16 (half the bytes, rounder)",
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def _add_processes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        help="train data-parallel in this many processes on this machine (torchrun; see docs/train.md)",
    )


def _read_options(args: argparse.Namespace):
    from kiln.data.corpus import ReadOptions

    return ReadOptions(
        errors=args.errors,
        text_field=args.text_field,
        skip_bad_lines=args.skip_bad_lines,
        one_per_line=args.one_per_line,
    )


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    # Accepted before and after the subcommand; only the top level sets defaults, so a value given
    # before the subcommand is not overwritten by the subcommand's parser.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="show the full traceback on errors",
    )
    p.add_argument(
        "--data-dir",
        default=None if defaults else argparse.SUPPRESS,
        help="data mirror folder to look in first (default: $KILN_DATA_DIR)",
    )
    return p


class OneLineParser(argparse.ArgumentParser):
    """A mistyped command line is one line, like every other user error, with where to read more."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"kiln: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kiln",
        description="Kiln: from raw text to your own chatbot.",
        epilog="Run `kiln COMMAND --help` for a command's options.",
        parents=[_global_options(True)],
    )
    parser.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    common = [_global_options(False)]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    data = commands.add_parser("data", help="list the named data sets and fetch them")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    data_commands.add_parser("list", parents=common, help="show each data set's size, license and local copy")
    get = data_commands.add_parser("get", parents=common, help="fetch a data set into the cache (checks its sha256)")
    get.add_argument("name")

    tok = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your text")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tok_commands.add_parser("train", parents=common, help="learn a byte-level BPE vocabulary from DATA")
    train.add_argument("data", help="a data-set name, a text file or folder, or JSONL/JSON/CSV/parquet")
    train.add_argument("--vocab-size", type=int, default=4096, help="ids in all, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to merge")
    train.add_argument("--out", required=True, help="folder to write tokenizer.json and kiln_tokenizer.json")
    _add_read_options(train)

    prep = commands.add_parser("prepare", parents=common, help="tokenize text into train/val token files for training")
    prep.add_argument("data", help="a data-set name, a text file or folder, or JSONL/JSON/CSV/parquet")
    prep.add_argument("--tokenizer", default="gpt2", help="char, gpt2 (default) or bpe:DIR")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the text kept for val")
    prep.add_argument("--out", required=True, help="folder for train.bin, val.bin, meta.json, tokenizer/")
    prep.add_argument("--dtype", default="auto", help="token file type: auto (uint16 if it fits), uint16, uint32")
    prep.add_argument("--unk", action="store_true", help="char: map unseen characters to <unk> instead of failing")
    prep.add_argument("--force", action="store_true", help="replace --out even if it holds something else")
    _add_read_options(prep)

    commands.add_parser("presets", parents=common, help="list the named model shapes")

    tr = commands.add_parser("train", parents=common, help="pretrain a GPT on text (prepared on the fly)")
    tr.add_argument("--data", required=True, help="a data-set name, a text file or folder, or a prepared folder")
    tr.add_argument("--tokenizer", help="char, gpt2 (default) or bpe:DIR; for raw text")
    tr.add_argument("--preset", help="model shape (`kiln presets`); default tiny")
    tr.add_argument(
        "--init-from",
        metavar="gpt2|distilgpt2|PATH",
        help="start from these weights (and their tokenizer): a Hub id, a Hugging Face folder or a Kiln checkpoint",
    )
    _add_one_per_line(tr)
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any model, optimizer or training setting, e.g. --set n_layer=6 --set lr=3e-4",
    )
    tr.add_argument("--config", help="a TOML or JSON file of settings (--set wins over it)")
    tr.add_argument("--out", required=True, help="run folder: last/, best/, metrics.jsonl, loss.png")
    tr.add_argument("--max-iters", type=int, help="stop after this many optimizer steps")
    tr.add_argument("--max-tokens", type=int, help="stop after this many training tokens")
    tr.add_argument("--max-time", help="stop after this long, e.g. 90s, 3m, 1h")
    tr.add_argument(
        "--epochs", type=float, help="passes over the train split's non-overlapping windows, reshuffled each epoch"
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint")
    _add_device(tr)
    _add_processes(tr)

    sa = commands.add_parser("sample", parents=common, help="generate text from a checkpoint, streamed")
    sa.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN_DIR/best")
    sa.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    sa.add_argument("--max-new-tokens", type=int, default=200)
    sa.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sa.add_argument("--top-k", type=int, default=200)
    sa.add_argument("--top-p", type=float)
    sa.add_argument("--repetition-penalty", type=float, default=1.0)
    sa.add_argument(
        "--known-words",
        action="store_true",
        help="only words the model has read (its tokenizer's words.txt) or the prompt holds",
    )
    sa.add_argument("--seed", type=int)
    sa.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop when this text appears (repeatable; \\n and \\t stand for newline and tab)",
    )
    sa.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, decoded as one batch")
    _add_decoding_precision(sa)
    _add_device(sa)

    ft = commands.add_parser(
        "finetune",
        parents=common,
        help="fine-tune a checkpoint to follow instructions, or to prefer chosen answers (DPO); full or LoRA",
    )
    ft.add_argument("base", nargs="?", help="the checkpoint to start from, e.g. RUN_DIR/best (or use --init-from)")
    ft.add_argument(
        "--init-from",
        metavar="gpt2|distilgpt2|PATH",
        help="start from a Hub id or Hugging Face folder (imported into OUT/base) or a Kiln checkpoint",
    )
    ft.add_argument(
        "--data", required=True, help="instruction data or (DPO) preference pairs: a data-set name or .json/.jsonl"
    )
    ft.add_argument(
        "--method",
        choices=["sft", "dpo"],
        default="sft",
        help="sft: learn the answers (default); dpo: prefer the chosen to the rejected answers of pairs",
    )
    ft.add_argument("--beta", type=float, help="DPO: how far the model may move from where it starts (default 0.1)")
    ft.add_argument("--format", choices=["alpaca", "dolly", "qa", "chat"], help="record format (default: detected)")
    ft.add_argument("--template", choices=["alpaca", "chat"], help="prompt template (default: chat for chat data)")
    ft.add_argument("--out", required=True, help="run folder: best/ (checkpoint or adapter), metrics.jsonl")
    ft.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank instead of every weight")
    ft.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (default 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    ft.add_argument("--lora-targets", choices=["attn", "mlp", "all"], default="attn", help="layers that get adapters")
    ft.add_argument("--epochs", type=float, help="passes over the training split (default 2; DPO 1)")
    ft.add_argument("--max-iters", type=int, help="stop after this many steps")
    ft.add_argument("--max-time", help="stop after this long, e.g. 90s, 2m")
    ft.add_argument("--early-stop", type=int, help="stop after this many evaluations without a better val loss")
    ft.add_argument("--prompt-loss", action="store_true", help="also take loss on prompt tokens")
    ft.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set lr=1e-3 --set block_size=512"
    )
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint")
    _add_device(ft)
    _add_processes(ft)

    ch = commands.add_parser("chat", parents=common, help="talk to a checkpoint in the terminal, streamed")
    ch.add_argument("checkpoint", help="a checkpoint or adapter folder, e.g. RUN_DIR/best")
    ch.add_argument("--system", help="a system message to start with")
    temperature = CHAT_SAMPLING["temperature"]
    ch.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    ch.add_argument("--top-k", type=int, default=CHAT_SAMPLING["top_k"])
    ch.add_argument("--top-p", type=float, default=CHAT_SAMPLING["top_p"])
    ch.add_argument("--max-new-tokens", type=int, default=CHAT_SAMPLING["max_new_tokens"])
    ch.add_argument("--repetition-penalty", type=float, default=1.0)
    ch.add_argument(
        "--known-words",
        action=argparse.BooleanOptionalAction,
        default=CHAT_SAMPLING["known_words"],
        help="only words the model has read or the conversation holds, when its tokenizer keeps them (default on)",
    )
    ch.add_argument("--seed", type=int)
    ch.add_argument("--compare", action="store_true", help="answer each question twice: the base, then the tuned model")
    _add_decoding_precision(ch)
    _add_device(ch)

    sv = commands.add_parser(
        "serve", parents=common, help="serve a model: an OpenAI-compatible API and a web chat (FastAPI + uvicorn)"
    )
    sv.add_argument("checkpoint", help="a run folder (its best/), a checkpoint or an adapter folder")
    sv.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", help="a LoRA adapter on the same base; repeat"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--db", help="SQLite file for saved conversations (default: chat.db in the run folder)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API call")
    sv.add_argument("--runs", help="a folder of runs to show on the runs page (default: the served run's parent)")
    sv.add_argument(
        "--threads", type=int, help="compute threads for decoding (default: one per core, less one for HTTP)"
    )
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model (default 8)")
    sv.add_argument("--queue", type=int, default=32, help="requests that may wait for a slot (default 32)")
    sv.add_argument(
        "--stream-interval",
        type=float,
        default=20.0,
        metavar="MS",
        help="send new text to streaming clients at most every MS milliseconds (default 20; 0: every token)",
    )
    _add_device(sv)

    ev = commands.add_parser(
        "evaluate", parents=common, help="score a checkpoint: loss and bits per byte on text, ROUGE-L on instructions"
    )
    ev.add_argument("checkpoint", help="a checkpoint or adapter folder")
    ev.add_argument("--data", help="text or instruction data (default: what the checkpoint was fine-tuned on)")
    ev.add_argument("--split", choices=["test", "val", "train", "all"], help="default: test (instructions), val (text)")
    ev.add_argument("--limit", type=int, help="at most this many examples (instructions) or characters (text)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer (default 256)")
    ev.add_argument("--stride", type=int, help="text: overlapping windows this far apart (default: none)")
    ev.add_argument("--text-field", help="field holding the text in JSON/JSONL records")
    ev.add_argument("--out", help="JSONL of per-example scores (default: beside the checkpoint)")
    ev.add_argument("--base", help="an adapter's base checkpoint, if it has moved")
    _add_device(ev)

    mg = commands.add_parser("merge", parents=common, help="fold a LoRA adapter into its base: a full checkpoint")
    mg.add_argument("adapter", help="an adapter folder that `kiln finetune --lora-r` wrote")
    mg.add_argument("--out", required=True, help="folder for the merged checkpoint")
    mg.add_argument("--base", help="the base checkpoint, if it has moved since the adapter was trained")
    mg.add_argument("--force", action="store_true", help="replace --out if it already exists")

    ex = commands.add_parser(
        "export",
        parents=common,
        help="write a checkpoint for transformers (a save_pretrained folder) or llama.cpp (GGUF)",
    )
    ex.add_argument("checkpoint", help="a checkpoint or LoRA adapter folder (an adapter is merged into its base)")
    ex.add_argument(
        "--to",
        choices=["hf", "gguf"],
        required=True,
        help="hf: transformers' save_pretrained folder; gguf: one file for llama.cpp (llama-style models)",
    )
    ex.add_argument("out", help="the folder (hf) or .gguf file to write")
    ex.add_argument("--base", help="an adapter's base checkpoint, if it has moved")
    ex.add_argument("--force", action="store_true", help="replace OUT if it already exists")

    im = commands.add_parser(
        "import", parents=common, help="convert a Hugging Face GPT-2 or Llama checkpoint into a Kiln checkpoint"
    )
    im.add_argument("source", help="a Hugging Face model folder, or a Hub id such as gpt2 or distilgpt2")
    im.add_argument("out", help="the Kiln checkpoint folder to write")
    im.add_argument("--force", action="store_true", help="replace OUT if it already exists")

    learn = commands.add_parser(
        "learn", parents=common, help="the from-zero lessons: list them, or run lesson N step by step"
    )
    learn.add_argument("number", nargs="?", type=int, help="the lesson to run (default: list them)")
    learn.add_argument("--out", help="folder for the lesson's plots (default runs/learn/N)")
    learn.add_argument("--corpus", help="text to learn from, for lessons that read one (a data-set name or file)")

    demo = commands.add_parser(
        "demo",
        parents=common,
        help="the main job: prepare WikiText-2 with a BPE trained on it, train a model on it for 200 s, "
        "sample, fine-tune it on instructions for 140 s, chat, score it on held-out questions",
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    demo.add_argument("--time", default="200s", help="how long to pretrain, e.g. 90s or 3m (default 200s)")
    demo.add_argument(
        "--finetune-time", default="140s", help="how long to fine-tune afterwards (default 140s; 0 skips it)"
    )
    demo.add_argument(
        "--run-name", help="the model's folder under --out (default: the preset and the time, e.g. chatbot-cpu-...)"
    )
    return parser


def cmd_data_list(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from kiln.data.fetch import is_present
    from kiln.data.registry import DATASETS

    table = Table("name", "size", "license", "local copy", "what it is", box=None, pad_edge=False)
    for ds in DATASETS.values():
        places = {is_present(f, args.data_dir) for f in ds.files.values()}
        local = (places.pop() or "no") if len(places) == 1 else "partly"
        table.add_row(
            ds.name, _human_size(ds.size), ds.license, "built in" if ds.format == "builtin" else local, ds.description
        )
    Console(width=max(Console().width, 140)).print(table)


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    return next(
        f"{size / scale:.1f} {unit}"
        for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
        if size >= scale or unit == "B"
    )


def cmd_data_get(args: argparse.Namespace) -> None:
    from kiln.data.fetch import resolve_dataset
    from kiln.data.registry import get_dataset

    dataset = get_dataset(args.name)
    if dataset.format == "builtin":
        print(f"{dataset.name} is built in: nothing to fetch")
        return
    for role, path in resolve_dataset(dataset, args.data_dir).items():
        print(f"{dataset.name} {role}: {path}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from kiln.atomic import atomic_dir
    from kiln.data.chunking import safe_chunks
    from kiln.data.corpus import open_corpus
    from kiln.data.tokenizers import BPETokenizer
    from kiln.data.tokenizers.base import META_FILE

    if args.min_frequency < 0:
        raise ConfigError(f"--min-frequency {args.min_frequency} must be 0 or more")
    folder = Path(args.out)
    # The folder is written whole or not at all, so it must hold nothing else (or an earlier tokenizer).
    if (folder.is_dir() and any(folder.iterdir()) and not (folder / META_FILE).is_file()) or folder.is_file():
        raise KilnError(f"{folder}: already holds something else; give --out a new or empty folder")
    corpora = open_corpus(args.data, args.data_dir, _read_options(args))
    read = {"chars": 0, "words": False}

    def texts():
        for chunk in (chunk for c in corpora.values() for doc in c.documents() for chunk in safe_chunks(doc)):
            read["chars"] += len(chunk)
            read["words"] = read["words"] or not chunk.isspace()
            yield chunk

    start = time.perf_counter()
    tokenizer = BPETokenizer.train(texts(), args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    if not read["words"]:
        label = ", ".join(c.label for c in corpora.values())
        what = f"holds only whitespace ({read['chars']:,} characters)" if read["chars"] else "is empty (no text found)"
        raise DataError(f"{label}: {what}; give text to learn the vocabulary from")
    with atomic_dir(folder) as tmp:
        tokenizer.save(tmp)
    print(f"trained {tokenizer.describe()} in {time.perf_counter() - start:.1f}s -> {folder}")
    print(f"use it with: kiln prepare DATA --tokenizer bpe:{folder} --out DIR")


def cmd_prepare(args: argparse.Namespace) -> None:
    from kiln.data.corpus import open_corpus
    from kiln.data.prepare import prepare_corpus

    corpora = open_corpus(args.data, args.data_dir, _read_options(args))
    start = time.perf_counter()
    prepared = prepare_corpus(
        corpora,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        dtype=args.dtype,
        unk=args.unk,
        force=args.force,
        data_dir=args.data_dir,
    )
    skipped = prepared.meta["source"]["skipped_lines"]
    if skipped:
        print(f"warning: skipped {skipped:,} malformed lines", file=sys.stderr)
    print(f"{prepared.summary()} in {time.perf_counter() - start:.1f}s -> {prepared.folder}")


def cmd_presets(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kiln.model.gpt import GPT
    from kiln.model.presets import PRESETS, preset_config

    table = Table(
        "name",
        "layers",
        "heads",
        "width",
        "context",
        "parameters (GPT-2 vocab)",
        "what it is",
        box=None,
        pad_edge=False,
    )
    for name, preset in PRESETS.items():
        config = preset_config(name)
        with torch.device("meta"):  # count parameters without allocating them
            params = GPT(config).num_params()
        table.add_row(
            name,
            str(config.n_layer),
            str(config.n_head),
            str(config.n_embd),
            str(config.block_size),
            f"{params / 1e6:.2f}M",
            preset.description
            + ("; recipe " + ", ".join(f"{k}={v}" for k, v in preset.recipe.items()) if preset.recipe else ""),
        )
    Console(width=max(Console().width, 140)).print(table)


def cmd_train(args: argparse.Namespace) -> int | None:
    if _relaunched(args):
        return args.exit_code
    from kiln.config import parse_overrides, read_config_file
    from kiln.data.corpus import ReadOptions
    from kiln.train.run import parse_duration, train_and_report, training_data

    start = None
    if args.init_from:
        if args.tokenizer or args.preset:
            raise KilnError("--init-from brings its own tokenizer and shape; drop --tokenizer and --preset")
        from kiln.interop.hf import load_starting_point

        start = load_starting_point(args.init_from)
    tokenizer = start.tokenizer if start else args.tokenizer
    data = training_data(args.data, tokenizer, args.data_dir, ReadOptions(one_per_line=args.one_per_line))
    settings = {**(read_config_file(args.config) if args.config else {}), **parse_overrides(args.set)}
    if args.device != "auto":
        settings["device"] = args.device
    limits = {
        "max_iters": args.max_iters,
        "max_tokens": args.max_tokens,
        "max_time": parse_duration(args.max_time) if args.max_time else None,
        "epochs": args.epochs,
    }
    best = train_and_report(
        data,
        args.preset,
        settings,
        {k: v for k, v in limits.items() if v},
        Path(args.out),
        args.resume,
        start=start,
        init_from=args.init_from,
    )
    print(f'\nsample more with: kiln sample {best} --prompt "..."')


def _relaunched(args: argparse.Namespace) -> bool:
    """With --nproc N (and not already under torchrun), run this same command as N processes."""
    import torch

    from kiln.device import pick_device
    from kiln.distributed import DistributedError, launch, launched_world

    if not args.nproc or args.nproc == 1 or launched_world().distributed:
        return False
    device = pick_device(args.device)  # a device that is not here is one line, not one per process
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise DistributedError(
            f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} CUDA GPU(s), one per process; "
            "give at most that many, or --device cpu"
        )
    args.exit_code = launch(args.nproc, _without_nproc(args.argv))
    return True


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def sampling_settings(args: argparse.Namespace, seed: int | None):
    """The sampling options `kiln sample` and `kiln chat` share, as a SamplingConfig."""
    from kiln.generate.sampling import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=seed,
        known_words=args.known_words,
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from kiln.checkpoint import load_checkpoint
    from kiln.device import pick_device, set_threads
    from kiln.generate.sampling import print_stream, sample_texts, stream_text
    from kiln.model.packed import pack_for_decoding
    from kiln.progress import progress_bar

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be at least 1")
    set_threads(None)
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device)
    if checkpoint.tokenizer is None:
        raise KilnError(f"{args.checkpoint}: has no tokenizer/ folder, so its output cannot be turned into text")
    model = pack_for_decoding(checkpoint.model, args.precision, rows=args.num_samples)
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    seeds = [None if args.seed is None else args.seed + number for number in range(args.num_samples)]
    if args.num_samples == 1:
        print(args.prompt, end="", flush=True)
        print_stream(stream_text(model, checkpoint.tokenizer, args.prompt, sampling_settings(args, seeds[0]), stops))
        return
    with progress_bar(f"{args.num_samples} samples", total=args.max_new_tokens, unit="steps") as advance:
        texts = sample_texts(
            model, checkpoint.tokenizer, args.prompt, sampling_settings(args, None), seeds, stops, lambda: advance(1)
        )
    for number, text in enumerate(texts):
        print(f"--- sample {number + 1}")
        print(args.prompt + text)


def cmd_finetune(args: argparse.Namespace) -> int | None:
    if _relaunched(args):
        return args.exit_code
    from kiln.config import parse_overrides
    from kiln.finetune.run import finetune_and_report, preference_tune_and_report
    from kiln.model.lora import LoraSettings
    from kiln.train.run import parse_duration

    settings = parse_overrides(args.set)
    for key, value in (
        ("epochs", args.epochs),
        ("max_iters", args.max_iters),
        ("max_time", parse_duration(args.max_time) if args.max_time else None),
        ("early_stop", args.early_stop),
        ("prompt_loss", args.prompt_loss or None),
        ("template", args.template),
        ("device", None if args.device == "auto" else args.device),
    ):
        if value is not None:
            settings[key] = value
    lora = None
    if args.lora_r is not None:
        lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    base = _finetune_base(args)
    if args.method == "dpo":
        if args.format:
            raise ConfigError("--format: preference pairs have one format (prompt or instruction, chosen, rejected)")
        if args.beta is not None:
            settings["beta"] = args.beta
        best = preference_tune_and_report(base, args.data, Path(args.out), settings, lora, args.data_dir, args.resume)
    elif args.beta is not None:
        raise ConfigError("--beta is DPO's setting; add --method dpo")
    else:
        best = finetune_and_report(
            base, args.data, Path(args.out), settings, lora, args.format, args.data_dir, resume=args.resume
        )
    print(f"\nchat with it: kiln chat {best}")


def _finetune_base(args: argparse.Namespace) -> str:
    """The base checkpoint: the positional one, or --init-from (a Hugging Face model is imported first,
    into OUT/base, so that an adapter has a Kiln checkpoint to name as its base)."""
    from kiln.checkpoint import is_adapter, is_checkpoint
    from kiln.interop.hf import import_hf

    if bool(args.base) == bool(args.init_from):
        raise KilnError("give the checkpoint to fine-tune either as BASE or as --init-from, not both or neither")
    if args.base or is_checkpoint(args.init_from) or is_adapter(args.init_from):
        return args.base or args.init_from
    base = Path(args.out) / "base"
    if (Path(args.out) / "base").exists() and args.resume:
        return str(base)
    if (Path(args.out) / "best").exists():
        raise KilnError(f"{args.out}: already holds a fine-tuning run; choose another --out")
    print(f"importing {args.init_from} -> {base}")
    return str(import_hf(args.init_from, base, force=True))  # OUT/base is Kiln's own, from an earlier try


def cmd_chat(args: argparse.Namespace) -> None:
    from kiln.device import pick_device
    from kiln.generate.chat import ChatSession, chat_loop

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (arrow keys and history at the prompt)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused by the chat, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    sampling = sampling_settings(args, seed=args.seed)
    device = pick_device(args.device)
    session = ChatSession.from_checkpoint(
        args.checkpoint, system=args.system, sampling=sampling, device=device, precision=args.precision
    )
    if args.compare:
        from kiln.checkpoint import run_name, tuned_from
        from kiln.generate.chat import CompareSessions

        base = tuned_from(args.checkpoint)
        if base is None:
            raise ConfigError(
                f"{args.checkpoint}: not a fine-tuned model with its base at hand, so there is nothing to compare"
            )
        base_session = ChatSession.from_checkpoint(
            base, system=args.system, sampling=sampling, device=device, precision=args.precision
        )
        names = [run_name(base), run_name(Path(args.checkpoint))]
        if names[0] == names[1]:
            names = ["base", "tuned"]
        session = CompareSessions(dict(zip(names, (base_session, session), strict=True)))
    chat_loop(session, interactive=sys.stdin.isatty())


def cmd_serve(args: argparse.Namespace) -> None:
    from kiln.serve.run import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: give a port from 1 to 65535")
    if args.runs is not None and not Path(args.runs).is_dir():
        raise ConfigError(f"--runs {args.runs}: no such folder; give the folder that holds your run folders")
    _check_listening(args.host, args.port)
    adapters = {}
    for pair in args.adapter:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair}: write NAME=PATH, e.g. --adapter maths=runs/maths-lora")
        adapters[name] = path
    serve(
        args.checkpoint,
        adapters,
        host=args.host,
        port=args.port,
        db=args.db,
        api_key=args.api_key,
        runs=args.runs,
        max_batch=args.max_batch,
        queue=args.queue,
        device=args.device,
        threads=args.threads,
        stream_interval_ms=args.stream_interval,
    )


def _check_listening(host: str, port: int) -> None:
    """Bind --host:--port once before loading any model, as uvicorn will: a name that does not resolve or
    a port in use is one line now, not uvicorn's log line after the models have loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(
            f"--host {host}: not an address of this machine ({e.strerror}); try 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                "another program may be using it, so choose another --port (or --host)"
            ) from None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kiln.device import set_threads
    from kiln.evaluate.run import evaluate

    if args.stride is not None and args.stride < 1:
        raise ConfigError(f"--stride {args.stride} must be at least 1")
    set_threads(None)
    evaluate(
        args.checkpoint,
        args.data,
        args.data_dir,
        limit=args.limit,
        out=args.out,
        max_new_tokens=args.max_new_tokens,
        split=args.split,
        stride=args.stride,
        text_field=args.text_field,
        base=args.base,
        device=args.device,
    )


def cmd_merge(args: argparse.Namespace) -> None:
    from kiln.atomic import refuse_to_replace
    from kiln.checkpoint import is_adapter, load_checkpoint, save_checkpoint

    if not is_adapter(args.adapter):
        raise KilnError(f"{args.adapter}: not a Kiln LoRA adapter folder (its config.json says otherwise)")
    refuse_to_replace(Path(args.out), args.force)
    checkpoint = load_checkpoint(args.adapter, base=args.base)
    info = {k: v for k, v in checkpoint.info.items() if k in ("template", "finetune")}
    folder = save_checkpoint(args.out, checkpoint.model, checkpoint.tokenizer, info=info)
    print(f"merged {args.adapter} into {checkpoint.info['base'] if not args.base else args.base} -> {folder}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.to == "gguf":
        from kiln.interop.gguf_export import export_gguf

        path = export_gguf(args.checkpoint, args.out, base=args.base, force=args.force)
        print(f"exported {args.checkpoint} -> {path}")
        print(f"run it with llama.cpp: llama-cli -m {path}")
        return
    from kiln.interop.hf import export_hf

    folder = export_hf(args.checkpoint, args.out, base=args.base, force=args.force)
    print(f"exported {args.checkpoint} -> {folder}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(folder)!r}) and AutoTokenizer.from_pretrained(...)")


def cmd_import(args: argparse.Namespace) -> None:
    from kiln.interop.hf import import_hf

    folder = import_hf(args.source, args.out, force=args.force)
    print(f"imported {args.source} -> {folder}")
    print(f'try it: kiln sample {folder} --prompt "..."')


def cmd_learn(args: argparse.Namespace) -> None:
    from kiln.lessons.catalog import LESSONS, LessonContext, run_lesson
    from kiln.lessons.narrate import Narrator

    if args.number is None:
        from rich.console import Console
        from rich.table import Table

        table = Table("lesson", "title", "what happens", box=None, pad_edge=False)
        for lesson in LESSONS.values():
            table.add_row(str(lesson.number), lesson.title, lesson.summary)
        Console(width=max(Console().width, 120)).print(table)
        print("run one with: kiln learn N   (read along: docs/learn/N-*.md)")
        return
    out = Path(args.out or f"runs/learn/{args.number}")
    context = LessonContext(Narrator(out), out, data_dir=args.data_dir, corpus=args.corpus)
    run_lesson(args.number, context)


def cmd_demo(args: argparse.Namespace) -> None:
    # Before torch loads: waiting threads sleep rather than spin. On 2 cores shared with other work, the
    # demo's model ran at 1,200-1,800 tokens/s with spinning threads and 3,100-3,300 with sleeping ones.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from kiln.demo import run_demo
    from kiln.train.run import parse_duration

    if args.run_name is not None and (not args.run_name.strip() or Path(args.run_name).name != args.run_name):
        raise ConfigError(f"--run-name {args.run_name!r}: give a folder name, without slashes")
    run_demo(
        Path(args.out),
        args.data_dir,
        parse_duration(args.time),
        parse_duration(args.finetune_time),
        run_name=args.run_name,
    )


COMMANDS = {
    ("data", "list"): cmd_data_list,
    ("data", "get"): cmd_data_get,
    ("tokenizer", "train"): cmd_tokenizer_train,
    ("prepare", None): cmd_prepare,
    ("presets", None): cmd_presets,
    ("train", None): cmd_train,
    ("sample", None): cmd_sample,
    ("finetune", None): cmd_finetune,
    ("chat", None): cmd_chat,
    ("serve", None): cmd_serve,
    ("evaluate", None): cmd_evaluate,
    ("merge", None): cmd_merge,
    ("export", None): cmd_export,
    ("import", None): cmd_import,
    ("learn", None): cmd_learn,
    ("demo", None): cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    from kiln.distributed import DistributedError, launched_world, leave, quiet_other_ranks

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    action = getattr(args, f"{args.command}_command", None)
    world = launched_world()
    quiet_other_ranks(world)
    who = f" (rank {world.rank})" if world.distributed else ""
    try:
        code = COMMANDS[(args.command, action)](args)
    except KilnError as e:
        if args.debug:
            raise
        # Every rank meets the same bad setting; only a rank's own trouble is worth one line per rank.
        if world.is_main or isinstance(e, DistributedError):
            print(f"kiln: error{who}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"kiln: interrupted{who}", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user named that cannot be read or written
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or e
        if isinstance(e, FileExistsError) and e.filename and Path(e.filename).is_file():
            why = "is a file, where a folder should be"
        print(
            f"kiln: error{who}: {where}{why}; check the path, its permissions and the free disk space",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except TrainingStopped as stop:
        if world.is_main:
            again = argv if "--resume" in argv else [*argv, "--resume"]
            print(f"kiln: {stop}; continue with: kiln {shlex.join(again)}", file=sys.stderr)
        return 128 + stop.signal_number
    except Exception as e:  # the last resort: a bug, said in one line
        if args.debug:
            raise
        print(
            f"kiln: internal error{who}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}. "
            "This is a bug in Kiln: please report it with the command you ran and its output with --debug",
            file=sys.stderr,
        )
        return 1
    finally:
        leave()
    return code or 0
