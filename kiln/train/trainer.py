"""The pretraining loop: batches in, checkpoints and metrics out, stopping at whichever limit binds first.

A run folder holds `last/` and `best/` checkpoints (with everything resuming needs), `metrics.jsonl`
and, at the end, `loss.png`. Resuming from `last/` continues so exactly that, on CPU, the losses after a
resume equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kiln.data.loaders import RandomWindows
from kiln.data.prepared import PreparedCorpus
from kiln.errors import ConfigError, KilnError
from kiln.model.gpt import GPT, GPTConfig
from kiln.train.checkpoint import TrainingState, is_checkpoint, load_checkpoint, save_checkpoint
from kiln.train.hardware import autocast_dtype, flops_per_token, peak_flops, pick_device, set_threads
from kiln.train.optim import OptimConfig, build_optimizers, lr_factor, set_learning_rates

METRICS_FILE = "metrics.jsonl"
PRECISIONS = ("auto", "fp32", "bf16")
# A --max-time run sets its schedule length from the pace measured over the first 10 steps of this
# session, and refits it after 30, 100 and 300 steps and every 500 after that, from the pace since the
# previous fit: the first steps run slow, and a shared machine drifts.
FIRST_FITS = (10, 30, 100, 300)
REFIT_EVERY = 500


def _is_fit_point(steps_done: int) -> bool:
    return steps_done in FIRST_FITS or (steps_done > 0 and steps_done % REFIT_EVERY == 0)


class TrainingDiverged(KilnError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    epochs: float | None = None  # train on this many times the train split's tokens (windows drawn at random)
    eval_interval: int = 200
    eval_batches: int = 20
    seed: int = 1337
    device: str = "auto"  # auto: cuda, then mps, then cpu
    precision: str = "auto"  # auto: bf16 autocast on GPUs and on CPUs with AMX / AVX-512 BF16, else fp32
    compile: bool = False  # torch.compile the model (pays a compile at start for faster steps on GPUs)
    threads: int | None = None  # CPU compute threads; None: one per physical core

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}': choose one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")

    def tokens_per_step(self, block_size: int) -> int:
        return self.batch_size * self.grad_accum * block_size


def planned_steps(train_config: TrainConfig, block_size: int, train_tokens: int) -> int | None:
    """Steps the run will take by its iteration, token and epoch limits (the first to bind); None when
    only a time limit is set."""
    tokens_per_step = train_config.tokens_per_step(block_size)
    limits = [train_config.max_iters] if train_config.max_iters else []
    if train_config.max_tokens:
        limits.append(math.ceil(train_config.max_tokens / tokens_per_step))
    if train_config.epochs:
        limits.append(math.ceil(train_config.epochs * train_tokens / tokens_per_step))
    return min(limits) if limits else None


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    best_val_loss: float
    last_val_loss: float
    run_dir: Path


def _fixed_batches(tokens, config: GPTConfig, train: TrainConfig, seed: int, label: str) -> list:
    loader = RandomWindows(tokens, config.block_size, train.batch_size, seed=seed, label=label)
    return [next(loader) for _ in range(train.eval_batches)]


@torch.no_grad()
def estimate_loss(model: GPT, batches: list, device: torch.device, amp: torch.dtype | None = None) -> float:
    model.eval()
    with _autocast(device, amp):
        losses = [model(x.to(device), targets=y.to(device))[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


def train(
    model_config: GPTConfig,
    optim_config: OptimConfig,
    train_config: TrainConfig,
    data: PreparedCorpus,
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_estimate: Callable[[int, float], None] | None = None,
    init_model: GPT | None = None,
    info: dict | None = None,
) -> TrainResult:
    """Train a GPT on prepared data into `run_dir`, from random weights or `init_model`'s.

    `on_step(step, loss)` is called after every step; `on_estimate(total_steps, seconds_left)` once the
    first 10 steps have been timed, and again whenever the pace is measured anew. `info` is recorded in
    every checkpoint's config.json.
    """
    run_dir = Path(run_dir)
    if not (train_config.max_iters or train_config.max_tokens or train_config.max_time or train_config.epochs):
        raise ConfigError("give a limit: --max-iters, --max-tokens, --max-time or --epochs")
    device = pick_device(train_config.device)
    threads = set_threads(train_config.threads) if device.type == "cpu" else torch.get_num_threads()
    amp = autocast_dtype(train_config.precision, device)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(device)
    if init_model is not None and not resume:
        model.load_state_dict(init_model.state_dict())
    step_model = torch.compile(model) if train_config.compile else model
    peak = peak_flops(device, amp, threads)
    flops_per_step = flops_per_token(model_config) * train_config.tokens_per_step(model_config.block_size)
    optimizers = build_optimizers(model, optim_config)
    train_tokens = data.tokens("train")
    loader = RandomWindows(
        train_tokens,
        model_config.block_size,
        train_config.batch_size,
        seed=train_config.seed,
        label=f"{data.folder} train",
    )
    train_eval = _fixed_batches(train_tokens, model_config, train_config, train_config.seed + 1, "train")
    val_eval = _fixed_batches(
        data.tokens("val"), model_config, train_config, train_config.seed + 2, f"{data.folder} val"
    )
    tokens_per_step = train_config.tokens_per_step(model_config.block_size)
    total_steps = planned_steps(train_config, model_config.block_size, len(train_tokens))

    step, best_val, last_val, elapsed_before = 0, math.inf, math.inf, 0.0
    if resume:
        step, best_val, last_val, elapsed_before, total_steps = _resume(
            run_dir, model, optimizers, loader, model_config, data, total_steps
        )
    elif (run_dir / "last").exists():
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(run_dir / METRICS_FILE, step)

    start = time.perf_counter() - elapsed_before
    evaluated_at = first_step = step
    # For fitting a time limit: wall time outside evaluations (so loading, logging and callbacks count),
    # and what the last evaluation-and-save cost.
    eval_clock = {"total": 0.0, "last": None}
    last_fit = (0, time.perf_counter())  # (steps into this session, wall time outside evaluations then)
    train_config_steps = total_steps  # the iteration / token limit, which a time limit can only shorten
    step_seconds = 0.0  # time in training steps since the last evaluation, for tokens/s and MFU
    # With a time limit and no schedule length yet (a new run, or one stopped before it calibrated).
    calibrate = bool(train_config.max_time) and (not resume or total_steps is None)

    def evaluate_and_save() -> float:  # reads the loop's step, timing, schedule length and best loss
        began = time.perf_counter()
        train_loss = estimate_loss(model, train_eval, device, amp)
        val_loss = estimate_loss(model, val_eval, device, amp)
        elapsed = time.perf_counter() - start
        steps_timed = step - evaluated_at
        record = {
            "step": step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": optimizers[-1].param_groups[0]["lr"],
            "tokens": step * tokens_per_step,
            "tokens_per_s": steps_timed * tokens_per_step / step_seconds if step_seconds else None,
            "mfu": steps_timed * flops_per_step / step_seconds / peak if step_seconds and peak else None,
            "elapsed_s": elapsed,
        }
        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        state = TrainingState(
            optimizers=[o.state_dict() for o in optimizers],
            progress={
                "step": step,
                "loader": loader.state_dict(),
                "best_val_loss": min(best_val, val_loss),
                "last_val_loss": val_loss,
                "elapsed_s": elapsed,
                "total_steps": total_steps,
            },
            rng=torch.get_rng_state(),
        )
        saved_info = {"optim": asdict(optim_config), "data": str(data.folder), **(info or {})}
        save_checkpoint(run_dir / "last", model, data.tokenizer, state, saved_info)
        if val_loss < best_val:
            save_checkpoint(run_dir / "best", model, data.tokenizer, state, saved_info)
        eval_clock["last"] = time.perf_counter() - began
        eval_clock["total"] += eval_clock["last"]
        return val_loss

    model.train()
    while total_steps is None or step < total_steps:
        elapsed = time.perf_counter() - start
        if train_config.max_time and elapsed >= train_config.max_time:
            break
        step_start = time.perf_counter()
        set_learning_rates(optimizers, lr_factor(step, total_steps or 10**9, optim_config))
        loss_sum = 0.0
        for _ in range(train_config.grad_accum):
            x, y = next(loader)
            with _autocast(device, amp):
                _, loss = step_model(x.to(device), targets=y.to(device))
            (loss / train_config.grad_accum).backward()
            loss_sum += loss.item() / train_config.grad_accum
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"loss became {loss_sum} at step {step + 1}; {run_dir / 'last'} holds the last good checkpoint. "
                f"Try a lower learning rate, e.g. --set lr={optim_config.lr / 3:.1e}"
            )
        if optim_config.grad_clip:
            # foreach: one fused norm over all gradients instead of one small op per tensor.
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim_config.grad_clip, foreach=True)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds += time.perf_counter() - step_start
        if _is_fit_point(step - first_step):
            outside_evals = time.perf_counter() - eval_clock["total"]
            per_step = (outside_evals - last_fit[1]) / (step - first_step - last_fit[0])
            last_fit = (step - first_step, outside_evals)
            # Before the first evaluation, guess it: 2 x eval_batches forward passes of ~1/3 step each.
            eval_seconds = eval_clock["last"] or 2 * train_config.eval_batches * per_step / 3
            per_step_with_evals = per_step + eval_seconds / train_config.eval_interval
            if calibrate:
                # Fit the schedule to the time left, so the decay ends as time runs out.
                left = train_config.max_time - (time.perf_counter() - start) - eval_seconds
                by_time = step + max(1, int(left / per_step_with_evals))
                total_steps = min(train_config_steps, by_time) if train_config_steps else by_time
            if on_estimate and total_steps:
                on_estimate(total_steps, (total_steps - step) * per_step_with_evals + eval_seconds)
        if on_step:
            on_step(step, loss_sum)
        done = total_steps is not None and step >= total_steps
        if step % train_config.eval_interval == 0 or done:
            last_val = evaluate_and_save()
            best_val, evaluated_at, step_seconds = min(best_val, last_val), step, 0.0
    if evaluated_at != step:  # stopped by the clock between evaluations
        last_val = evaluate_and_save()
        best_val = min(best_val, last_val)
    return TrainResult(step, step * tokens_per_step, time.perf_counter() - start, best_val, last_val, run_dir)


def _resume(run_dir, model, optimizers, loader, model_config, data, total_steps):
    last = run_dir / "last"
    if not is_checkpoint(last):
        raise ConfigError(f"{last}: not a Kiln checkpoint, nothing to resume; drop --resume to start a new run")
    checkpoint = load_checkpoint(last)
    if checkpoint.model.config != model_config:
        saved, asked = checkpoint.model.config.to_dict(), model_config.to_dict()
        differs = ", ".join(f"{k} {saved[k]} vs {asked[k]}" for k in saved if saved[k] != asked[k])
        raise ConfigError(f"{last}: the checkpoint's model config disagrees ({differs}); resume with the same settings")
    if checkpoint.tokenizer is None or checkpoint.tokenizer.fingerprint() != data.tokenizer.fingerprint():
        raise ConfigError(f"{last}: was trained with another tokenizer than {data.folder} uses")
    model.load_state_dict(checkpoint.model.state_dict())
    for optimizer, state_dict in zip(optimizers, checkpoint.state.optimizers, strict=True):
        optimizer.load_state_dict(state_dict)
    progress = checkpoint.state.progress
    loader.load_state_dict(progress["loader"])
    torch.set_rng_state(checkpoint.state.rng)
    # An iteration or token limit given now wins (it may extend the run); a time-limited run keeps the
    # schedule length it calibrated, so the learning rate carries on where it was.
    total = total_steps if total_steps is not None else progress.get("total_steps")
    return progress["step"], progress["best_val_loss"], progress["last_val_loss"], progress["elapsed_s"], total


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
