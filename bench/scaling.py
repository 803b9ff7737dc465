"""One process with 2 threads against 2 data-parallel processes with 1 thread each (torchrun, gloo),
on the same global batch, at the `shakespeare-cpu` shape and at GPT-2 124M's.

Both sides run Kiln's training engine on Tiny Shakespeare's characters; each timing skips the first
steps (warm-up) and takes the mean step time over the rest. The two sides take turns, `--rounds`
times, so that the machine's drift falls on both. Prints a table of tokens/s, step time and ratios.

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/scaling.py            # about 6 minutes
    KILN_DATA_DIR=../shared/data .venv/bin/python bench/scaling.py --quick    # shakespeare-cpu only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (preset, settings, measured steps, warm-up steps)
    "shakespeare-cpu": ("shakespeare-cpu", {"batch_size": 12, "grad_accum": 1}, 150, 20),
    "124M": ("gpt2-124m", {"batch_size": 4, "grad_accum": 1, "block_size": 256}, 4, 2),
}


def worker(shape: str, out: Path) -> None:
    """Train `shape` for its warm-up + measured steps and write the step times (rank 0)."""
    from kiln.data.corpus import open_corpus
    from kiln.data.prepare import prepare_corpus
    from kiln.distributed import launched_world
    from kiln.train.run import build_settings
    from kiln.train.trainer import train

    preset, settings, steps, warmup = SHAPES[shape]
    data = prepare_corpus(open_corpus("tinyshakespeare", None), "char", out / "data")
    limits = {"max_iters": steps + warmup, "eval_interval": 10**6, "eval_batches": 1}
    run = build_settings(preset, data.tokenizer.vocab_size, dict(settings), limits)
    marks: list[float] = []
    train(
        run.model, run.optim, run.train, data, out / "run", on_step=lambda step, loss: marks.append(time.perf_counter())
    )
    if launched_world().is_main:
        times = [b - a for a, b in zip(marks[warmup - 1 : -1], marks[warmup:], strict=True)]
        tokens = run.train.rows_per_step * run.model.block_size
        (out / "times.json").write_text(json.dumps({"step_s": statistics.mean(times), "tokens_per_step": tokens}))


def measure(shape: str, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "KILN_QUIET": "1", "OMP_NUM_THREADS": str(2 // processes)}
        command = [sys.executable, __file__, "--worker", shape, str(out)]
        if processes > 1:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={processes}",
                *command[1:],
            ]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return json.loads((out / "times.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="turns each side takes (default 2)")
    parser.add_argument("--quick", action="store_true", help="the shakespeare-cpu shape only")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    shapes = ["shakespeare-cpu"] if args.quick else list(SHAPES)
    rows = []
    for shape in shapes:
        step_s = {1: [], 2: []}
        for _ in range(args.rounds):
            for processes in (1, 2):
                result = measure(shape, processes)
                step_s[processes].append(result["step_s"])
                tokens = result["tokens_per_step"]
        for processes, label in ((1, "1 process x 2 threads"), (2, "2 processes x 1 thread")):
            mean = statistics.mean(step_s[processes])
            rows.append((shape, label, tokens / mean, mean * 1000, statistics.mean(step_s[1]) / mean))
    print("| shape | run | tokens/s | step (ms) | vs 1 process |\n| --- | --- | --- | --- | --- |")
    for shape, label, rate, ms, ratio in rows:
        print(f"| {shape} | {label} | {rate:,.0f} | {ms:,.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
