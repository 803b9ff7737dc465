"""What `kiln train` does around the loop: find or prepare the data, build the configs, show progress,
and report (summary, loss.png, a sample) at the end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.atomic import write_lock
from kiln.checkpoint import Checkpoint, load_checkpoint
from kiln.config import apply_settings
from kiln.data.corpus import ReadOptions, open_corpus
from kiln.data.fetch import cache_dir
from kiln.data.prepare import prepare_corpus
from kiln.data.prepared import PreparedCorpus, is_prepared_dir
from kiln.data.tokenizers import Tokenizer, tokenizer_from_spec
from kiln.device import pick_device
from kiln.distributed import launched_world
from kiln.errors import ConfigError
from kiln.generate.sampling import SamplingConfig, print_stream, stream_text
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.presets import get_preset, preset_config
from kiln.progress import progress_bar
from kiln.train.engine import describe_setup
from kiln.train.optim import OptimConfig
from kiln.train.trainer import METRICS_FILE, TrainConfig, planned_steps, pretraining_rows, steps_per_epoch, train

DEFAULT_PRESET = "tiny"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90s', '3m', '1.5h' or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"--max-time {text}: write a duration such as 90s, 3m or 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def format_duration(seconds: float) -> str:
    """72.4 -> '1m12s'; 3700 -> '1h01m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def training_data(
    spec: str,
    tokenizer: str | Tokenizer | None,
    data_dir: str | os.PathLike | None,
    options: ReadOptions | None = None,
) -> PreparedCorpus:
    """A prepared folder as it is, or a data-set name / file prepared on the fly into the user cache.

    The cache folder is named by the data, tokenizer and reading options asked for; `prepare` itself
    reuses it while the source's checksum is unchanged, so a second run starts at once.
    """
    options = options or ReadOptions()
    if is_prepared_dir(Path(spec)):
        expected = tokenizer if isinstance(tokenizer, Tokenizer) else None
        if isinstance(tokenizer, str) and tokenizer != "char":
            expected = tokenizer_from_spec(tokenizer, data_dir)
        return PreparedCorpus.open(spec, expect_tokenizer=expected)
    tokenizer = tokenizer or "gpt2"
    tokenizer_key = tokenizer.fingerprint() if isinstance(tokenizer, Tokenizer) else tokenizer
    tokenizer_name = tokenizer.kind if isinstance(tokenizer, Tokenizer) else tokenizer.split(":")[0]
    source = str(Path(spec).resolve()) if Path(spec).exists() else spec
    key = hashlib.sha256(f"{source}\0{tokenizer_key}\0{options.one_per_line}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).name or spec)[:40]
    folder = cache_dir() / "prepared" / f"{name}-{tokenizer_name}-{key}"
    with write_lock(folder):  # every rank of a run asks for it at once: one prepares, the rest reuse
        return prepare_corpus(open_corpus(spec, data_dir, options), tokenizer, folder, data_dir=data_dir)


@dataclass
class RunSettings:
    model: GPTConfig
    optim: OptimConfig
    train: TrainConfig


# What a run started from given weights may still change about the model.
CHANGEABLE_WHEN_INITIALISED = ("block_size", "dropout")


def build_settings(
    preset: str | None, vocab_size: int, settings: dict, limits: dict, start: GPTConfig | None = None
) -> RunSettings:
    """Preset shape and recipe (or the shape of the weights the run starts from) + the data's vocabulary
    + file/--set settings + the command's limits."""
    if start is None:
        preset = preset or DEFAULT_PRESET
        model, recipe = preset_config(preset, vocab_size=vocab_size), get_preset(preset).recipe
    else:
        model, recipe = start, {}
    ordered = {**recipe, **settings, **limits}
    model, optim, train = apply_settings([model, OptimConfig(), TrainConfig()], ordered)
    if start is not None:
        fixed = [
            f"{k} {getattr(start, k)}"
            for k in start.to_dict()
            if k not in CHANGEABLE_WHEN_INITIALISED and getattr(model, k) != getattr(start, k)
        ]
        if fixed:
            raise ConfigError(
                f"--init-from fixes the model's shape ({', '.join(fixed)}); only "
                f"{' and '.join(CHANGEABLE_WHEN_INITIALISED)} can change"
            )
    return RunSettings(model, optim, train)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png with the train and val curves from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    axis.plot(steps, [r["train_loss"] for r in rows], label="train", marker="o", markersize=3)
    axis.plot(steps, [r["val_loss"] for r in rows], label="val", marker="o", markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy loss")
    axis.set_title(f"{run_dir.name}: best val {min(r['val_loss'] for r in rows):.3f}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = run_dir / "loss.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class _StepRate:
    """Tokens/s over the last few seconds of steps, for the progress bar."""

    def __init__(self, tokens_per_step: int, window: float = 5.0):
        self.tokens_per_step, self.window, self.marks = tokens_per_step, window, []

    def tokens_per_s(self, step: int) -> float:
        now = time.perf_counter()
        self.marks = [(s, t) for s, t in self.marks if now - t < self.window] + [(step, now)]
        (first_step, first_time), (last_step, last_time) = self.marks[0], self.marks[-1]
        return (last_step - first_step) * self.tokens_per_step / max(last_time - first_time, 1e-9)


def train_and_report(
    data: PreparedCorpus,
    preset: str | None,
    settings: dict,
    limits: dict,
    out: Path,
    resume: bool = False,
    start: Checkpoint | None = None,
    init_from: str | None = None,
) -> Path:
    """What `kiln train` does: say what will run, train with a progress bar, then write loss.png and
    print a summary and a sample. `start` holds the weights named by `init_from`, if any. Returns the
    best checkpoint's folder."""
    run = build_settings(preset, data.tokenizer.vocab_size, settings, limits, start and start.model.config)
    if start is not None:
        start.model.resize_context(run.model.block_size)
    with torch.device("meta"):  # count parameters without allocating them
        params = GPT(run.model).num_params()
    tokens_per_step = run.train.rows_per_step * run.model.block_size
    print(f"data: {data.summary()}")
    print(
        f"model: {init_from or preset or DEFAULT_PRESET} "
        f"({run.model.block_style}, {run.model.n_layer} layers, {run.model.n_head} heads, "
        f"{run.model.n_embd} wide, context {run.model.block_size}): {params / 1e6:.2f}M parameters; "
        f"{tokens_per_step:,} tokens per step"
    )
    print(describe_setup(run.train, run.model, full_windows=True))
    rate = _StepRate(tokens_per_step)
    rows = pretraining_rows(data.tokens("train"), run.model, run.train, f"{data.folder} train")
    steps_limit = planned_steps(run.train, steps_per_epoch(rows), tokens_per_step)
    with progress_bar("training", total=steps_limit, unit="steps") as advance:
        estimated = []

        def estimate(total_steps: int, seconds_left: float) -> None:
            advance(0, total=total_steps)
            if not estimated:  # say it once; later refits only move the bar's end
                print(f"estimated run time: {format_duration(seconds_left)} more for {total_steps:,} steps", flush=True)
                estimated.append(seconds_left)

        result = train(
            run.model,
            run.optim,
            run.train,
            data,
            out,
            resume=resume,
            on_step=lambda step, loss: advance(
                1, f"training, loss {loss:.3f}, {rate.tokens_per_s(step):,.0f} tokens/s"
            ),
            on_estimate=estimate,
            init_model=start and start.model,
            info={"init_from": init_from} if init_from else None,
        )
    if not launched_world().is_main:  # rank 0 reports; the others are done
        return out / "best"
    plot = plot_losses(out)
    print(
        f"done: {result.steps:,} steps, {result.tokens:,} tokens in {format_duration(result.seconds)} "
        f"({result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s); best val loss {result.best_val_loss:.4f}"
    )
    print(f"checkpoints: {out / 'last'}, {out / 'best'}" + (f"; loss curve: {plot}" if plot else ""))
    best = load_checkpoint(out / "best", pick_device(run.train.device))
    print("sample:")
    print_stream(
        stream_text(best.model, best.tokenizer, "", SamplingConfig(temperature=0.8, top_k=200, seed=run.train.seed))
    )
    return out / "best"
