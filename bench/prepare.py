"""Benchmark `kiln prepare`: tokens/s and peak RSS for a large corpus with each tokenizer.

Builds a UTF-8 text file of about --size-mb MiB (default 500) in a temp dir by repeating real text
(WikiText-2 train + Tiny Shakespeare, found through the data mirror), trains a byte-level BPE of 4,096 ids
on Tiny Shakespeare once, then runs the real CLI, `python -m kiln prepare FILE --tokenizer T`, for T in
char, gpt2 and bpe:DIR, each in its own child process. For each it reports wall time, throughput and the
child's peak resident memory (ru_maxrss from wait4); the bar is a peak RSS under 1 GiB. Exits 1 if any run
fails or goes over it.

Run it from the repository root (needs a few GB of free space in $TMPDIR):

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/prepare.py [--size-mb 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln.data.fetch import resolve_dataset
from kiln.data.registry import get_dataset

MIB = 1 << 20
RSS_LIMIT_MB = 1024
SOURCES = (("wikitext-2", "train"), ("tinyshakespeare", "text"))


@dataclass
class Child:
    wall_s: float
    peak_rss_mb: float
    output: str


@dataclass
class Result:
    tokenizer: str
    vocab: int
    tokens: int
    chars: int
    child: Child


def build_corpus(path: Path, size_bytes: int) -> int:
    """Write about `size_bytes` of real text to `path` by repeating the sources; returns the bytes written.

    The last copy is cut at a line end so the file stays valid UTF-8. Only one source is in memory at a time.
    """
    sources = [resolve_dataset(get_dataset(name))[role] for name, role in SOURCES]
    written = 0
    with open(path, "wb") as out:
        while written < size_bytes:
            for source in sources:
                room = size_bytes - written
                if room <= 0:
                    break
                text = source.read_bytes()
                if len(text) > room:
                    text = text[: text.rfind(b"\n", 0, room) + 1] or text[:room].decode("utf-8", "ignore").encode()
                out.write(text)
                written += len(text)
    return written


def run_child(args: list[str], log: Path) -> Child:
    """Run `python -m kiln ARGS` quietly; its wall time and peak RSS (ru_maxrss is in KiB on Linux)."""
    env = {**os.environ, "KILN_QUIET": "1"}
    start = time.perf_counter()
    with open(log, "w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kiln", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"kiln {' '.join(args)} exited with {proc.returncode}:\n{output}")
    return Child(wall, usage.ru_maxrss / 1024, output.strip())


def prepare(corpus: Path, tokenizer: str, out: Path, log: Path) -> Result:
    child = run_child(["prepare", str(corpus), "--tokenizer", tokenizer, "--out", str(out), "--force"], log)
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    splits = [meta["splits"][s] for s in ("train", "val")]
    return Result(
        tokenizer.split(":")[0],
        meta["tokenizer"]["vocab_size"],
        sum(s["tokens"] for s in splits),
        sum(s["chars"] for s in splits),
        child,
    )


def report(results: list[Result], corpus_bytes: int) -> Table:
    table = Table(
        "tokenizer",
        "vocab",
        "tokens",
        "chars/token",
        "wall s",
        "tokens/s",
        "MB text/s",
        "peak RSS MB",
        "RSS < 1 GB",
        title=f"kiln prepare, {corpus_bytes / MIB:,.0f} MB corpus",
    )
    for r in results:
        rss_ok = r.child.peak_rss_mb <= RSS_LIMIT_MB  # the bar: 1 GB = 1,024 MiB
        table.add_row(
            r.tokenizer,
            f"{r.vocab:,}",
            f"{r.tokens:,}",
            f"{r.chars / r.tokens:.2f}",
            f"{r.child.wall_s:.1f}",
            f"{r.tokens / r.child.wall_s:,.0f}",
            f"{corpus_bytes / MIB / r.child.wall_s:.2f}",
            f"{r.child.peak_rss_mb:,.0f}",
            "PASS" if rss_ok else "[red]FAIL[/red]",
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=500, help="corpus size in MiB (default 500)")
    args = parser.parse_args()
    console = Console(width=120)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        start = time.perf_counter()
        corpus_bytes = build_corpus(corpus, int(args.size_mb * MIB))
        console.print(
            f"corpus: {corpus_bytes:,} bytes ({corpus_bytes / MIB:,.1f} MB) of WikiText-2 train + "
            f"Tiny Shakespeare, written in {time.perf_counter() - start:.1f}s"
        )

        bpe_dir = tmp / "bpe-4096"
        results: list[Result] = []
        try:
            train = run_child(
                ["tokenizer", "train", "tinyshakespeare", "--vocab-size", "4096", "--out", str(bpe_dir)],
                tmp / "train.log",
            )
            console.print(
                f"BPE 4,096 trained on Tiny Shakespeare: {train.wall_s:.1f}s wall, peak RSS {train.peak_rss_mb:,.0f} MB"
            )
            for tokenizer in ("char", "gpt2", f"bpe:{bpe_dir}"):
                results.append(prepare(corpus, tokenizer, tmp / "prepared", tmp / "prepare.log"))
                summary = results[-1].child.output.splitlines()[-1].replace(f"{tmp}/", "")
                console.print(f"  kiln: {summary}", markup=False, highlight=False, soft_wrap=True)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1

    console.print(report(results, corpus_bytes))
    over = [r.tokenizer for r in results if r.child.peak_rss_mb > RSS_LIMIT_MB]
    if over:
        console.print(f"FAIL: peak RSS over {RSS_LIMIT_MB} MB with {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
