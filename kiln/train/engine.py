"""The one training loop. Pretraining, instruction fine-tuning and preference tuning hand it a model, a
`Stage` (which rows each step reads, how a batch is built, its loss, its evaluation and how its
checkpoints are written) and the limits; the engine does the rest: gradient accumulation, autocast,
clipping, evaluation, `last/` and `best/` checkpoints, the time budget, the divergence stop, early
stopping, metrics, and exact resume, on one process or many (DDP, or FSDP2 with `parallel=fsdp`).

Why resume is exact, on any number of processes: step s reads the rows `stage.rows(s)` (a function of
the seed and s alone), split the same way whatever the world size, and each micro-batch's dropout RNG
is seeded from (seed, s, micro-batch). So a checkpoint needs only the weights, the optimizer state and
the step, and a run saved by 2 processes resumes in 1 and the reverse.

The loss of a step is the sum of its per-unit losses (answer tokens, windows' tokens, preference
pairs) over every micro-batch of every rank, divided by the global count of units: accumulation and
the number of processes change how the work is cut, never the number being minimised.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.atomic import linked_copy, recover_dir
from kiln.checkpoint import TrainingState, resumable_step
from kiln.device import autocast_dtype, peak_flops, physical_cores, pick_device, precision_reason, set_threads
from kiln.distributed import (
    DistributedError,
    World,
    all_reduce_sum,
    all_reduce_sum_later,
    barrier,
    broadcast_object,
    broadcast_tensor,
    join,
    launched_world,
)
from kiln.errors import ConfigError, KilnError, TrainingStopped
from kiln.model.gpt import GPT, IGNORE, GPTConfig
from kiln.train.metrics import METRICS_FILE, MetricsLog
from kiln.train.optim import OptimConfig, UpdateInBackward, build_optimizers, continued_lr_factor, set_learning_rates
from kiln.train.parallel import (
    check_optimizer_fits,
    full_model_copy,
    load_optimizer_states,
    optimizer_states,
    reshard,
    sync_gradients,
    wrap_model,
)

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
LOGS = ("jsonl", "tensorboard")
# A --max-time run sets its schedule length from the pace measured over the first 10 steps of this
# session, and refits it after 30, 100 and 300 steps and every 500 after that, from the pace since the
# previous fit: the first steps run slow, and a shared machine drifts.
FIRST_FITS = (10, 30, 100, 300)
REFIT_EVERY = 500

__all__ = ["METRICS_FILE", "IGNORE", "Stage", "TrainConfig", "TrainResult", "TrainingDiverged", "train_model"]


def _is_fit_point(steps_done: int) -> bool:
    return steps_done in FIRST_FITS or (steps_done > 0 and steps_done % REFIT_EVERY == 0)


class TrainingDiverged(KilnError):
    """The loss became NaN or infinite."""


def catch_stop_requests() -> tuple[list[int], Callable[[], None]]:
    """Take the first SIGINT or SIGTERM as a request (its number lands in the list) so the loop can
    finish its step and save; a second one acts at once (Ctrl-C: KeyboardInterrupt), the checkpoint on
    disk still whole. Returns the list and a function that puts the previous handlers back. Outside
    the main thread signals cannot be caught and the defaults stay."""
    asked: list[int] = []
    previous = {}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def request(number, frame) -> None:
        asked.append(number)
        restore()

    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, request)
    except ValueError:  # not the main thread
        restore()
        previous.clear()
    return asked, restore


@dataclass
class TrainConfig:
    """How to train, whatever the stage: batch, limits, evaluation, device and parallelism."""

    batch_size: int = 12  # rows (windows or examples) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step, over all processes together
    max_iters: int | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    epochs: float | None = None  # this many passes over the training data
    eval_interval: int = 200
    eval_batches: int = 20
    early_stop: int = 0  # stop after this many evaluations without a better val loss; 0 = never
    seed: int = 1337
    device: str = "auto"  # auto: cuda, then mps, then cpu
    precision: str = "auto"  # auto: bf16 autocast where it is faster (kiln.device.precision_reason)
    compile: bool = False  # torch.compile the model (pays a compile at start for faster steps on GPUs)
    threads: int | None = None  # CPU compute threads per process; None: the physical cores, shared by the processes
    parallel: str = "ddp"  # with several processes: ddp (a full copy each) or fsdp (weights sharded, FSDP2)
    log: str = "jsonl"  # metrics.jsonl always; tensorboard also writes TensorBoard event files
    # false: checkpoints hold the weights alone (a third of the bytes with AdamW: 0.65 GB, not 1.95, for
    # an untied GPT-2 124M), last/ is written only when the val loss improves and at the end, and the
    # run cannot be resumed; for short runs of big models, whose checkpoints would cost more to write at
    # every evaluation than a resume could save.
    resumable: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("precision", PRECISIONS), ("parallel", PARALLEL), ("log", LOGS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} '{getattr(self, name)}': choose one of {', '.join(choices)}")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs {self.epochs} must be above 0")
        if self.early_stop < 0:
            raise ConfigError(f"early_stop {self.early_stop} must be 0 (never) or more")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def has_limit(self) -> bool:
        return bool(self.max_iters or self.max_tokens or self.max_time or self.epochs)


def token_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets that are not IGNORE."""
    inputs, targets = batch
    return model(inputs, targets, loss_sum=True)[1]


def target_count(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return int((batch[1] != IGNORE).sum())


def batch_to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(batch_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch


@dataclass
class Stage:
    """What a training stage gives the engine.

    `rows(step)` names the step's training rows (windows, examples, pairs) in a fixed order, from the seed
    and the step alone; `batch(rows)` builds one micro-batch of them. `loss_sum(model, batch)` sums the
    loss over the batch's units and `units(batch)` counts them. `evaluate(model)` returns metrics with
    at least `val_loss`. `save(folder, model, state)` writes a checkpoint with its training state;
    `restore(folder, model)` loads one's weights into `model` and returns its training state.
    """

    rows: Callable[[int], np.ndarray]
    batch: Callable[[np.ndarray], Any]
    evaluate: Callable[[nn.Module], dict[str, float]]
    save: Callable[[Path, nn.Module, TrainingState], None]
    restore: Callable[[Path, nn.Module], TrainingState]
    steps_per_epoch: float
    tokens_per_step: int | None = None  # known when every row is a full window (pretraining)
    loss_sum: Callable[[nn.Module, Any], torch.Tensor] = token_loss_sum
    units: Callable[[Any], int] = target_count
    evaluate_at_start: bool = False  # fine-tuning reports the loss before it trains


@dataclass
class TrainResult:
    steps: int
    tokens: int | None
    seconds: float
    first_val_loss: float | None  # before any training, when the stage evaluates at the start
    best_val_loss: float
    last_val_loss: float
    stopped_early: bool
    run_dir: Path


def planned_steps(config: TrainConfig, steps_per_epoch: float, tokens_per_step: int | None) -> int | None:
    """Steps the run will take by its iteration, token and epoch limits (the first to bind); None when
    only a time limit is set."""
    limits = [config.max_iters] if config.max_iters else []
    if config.max_tokens:
        if not tokens_per_step:
            raise ConfigError(
                "--max-tokens needs fixed-length rows; fine-tuning takes --max-iters, --epochs or --max-time"
            )
        limits.append(math.ceil(config.max_tokens / tokens_per_step))
    if config.epochs:
        limits.append(math.ceil(config.epochs * steps_per_epoch))
    return min(limits) if limits else None


@dataclass
class StepSplit:
    """How one step's rows are cut into this rank's micro-batches.

    The rows are cut into `grad_accum` micro-batches, the same for any world size. With accumulation a
    multiple of the world size each rank runs whole micro-batches (and the result does not depend on
    the world size at all); otherwise each micro-batch's rows are shared out between the ranks.
    """

    world: World
    grad_accum: int
    by_accumulation: bool

    @classmethod
    def plan(cls, config: TrainConfig, world: World) -> StepSplit:
        if config.grad_accum % world.size == 0:
            return cls(world, config.grad_accum, True)
        if config.batch_size % world.size == 0:
            return cls(world, config.grad_accum, False)
        raise ConfigError(
            f"a step of grad_accum {config.grad_accum} x batch_size {config.batch_size} cannot be split over "
            f"{world.size} processes; make grad_accum or batch_size a multiple of {world.size}"
        )

    def micro_batch_tokens(self, batch_size: int, block_size: int) -> int:
        """How many tokens this rank's micro-batches hold when every row is a full window."""
        return (batch_size if self.by_accumulation else batch_size // self.world.size) * block_size

    def micro_rows(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(global micro-batch number, rows) for each micro-batch this rank runs, in order."""
        micro = np.array_split(rows, self.grad_accum)
        if self.by_accumulation:
            per_rank = self.grad_accum // self.world.size
            first = self.world.rank * per_rank
            return [(first + i, micro[first + i]) for i in range(per_rank)]
        return [(i, np.array_split(m, self.world.size)[self.world.rank]) for i, m in enumerate(micro)]


def _micro_seed(seed: int, step: int, micro: int, rank_part: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank_part]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


def cast_frozen_weights(model: nn.Module, amp: torch.dtype | None) -> Callable[[], None]:
    """Let each frozen nn.Linear (a LoRA base, a tied output head) compute with its weight cast to `amp`
    once, instead of autocast casting it anew at every call: autocast keeps its casts only for weights
    that take gradients, and re-reading every frozen weight each step was a fifth of a CPU LoRA step.
    The products are the same (autocast makes the same cast); outside its own forward a module holds its
    fp32 weight, so saves, merges and peft's token layers never see the copy. Returns the undo."""
    if amp is None:
        return lambda: None
    copies = {
        module: nn.Parameter(module.weight.detach().to(amp), requires_grad=False)
        for module in model.modules()
        if type(module) is nn.Linear and not module.weight.requires_grad and module.weight.dtype == torch.float32
    }
    originals = {module: module.weight for module in copies}

    def swap_in(module: nn.Module, args) -> None:
        module._parameters["weight"] = copies[module]

    def swap_out(module: nn.Module, args, output) -> None:
        module._parameters["weight"] = originals[module]

    hooks = [m.register_forward_pre_hook(swap_in) for m in copies] + [m.register_forward_hook(swap_out) for m in copies]

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        for module, weight in originals.items():
            module._parameters["weight"] = weight

    return undo


def model_config_of(model: nn.Module) -> GPTConfig | None:
    """The GPT's shape inside `model` (which may be wrapped by peft)."""
    return next((m.config for m in model.modules() if isinstance(m, GPT)), None)


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's score and mix
    products (PaLM appendix B), counting the full T x T square as PaLM and nanoGPT do."""
    with torch.device("meta"):
        params = GPT(config).num_params(exclude_positions=True)
    embedding = config.vocab_size * config.n_embd if not config.tie_word_embeddings else 0
    return 6 * (params - embedding) + 12 * config.n_layer * config.n_embd * config.block_size


def train_device(config: TrainConfig, world: World) -> torch.device:
    """The device this process trains on: under torchrun each CUDA process takes its LOCAL_RANK's GPU."""
    device = pick_device(config.device)
    if device.type == "cuda" and world.distributed:
        if config.device not in ("auto", "cuda"):
            raise DistributedError(
                f"--device {config.device}: with several processes each takes its own GPU; use --device cuda"
            )
        device = pick_device(f"cuda:{world.local_rank}")
    return device


def process_threads(config: TrainConfig, world: World) -> int:
    """CPU compute threads for this process: as set, or the physical cores shared by this machine's ranks."""
    return config.threads or max(1, physical_cores() // world.local_size)


def describe_setup(
    config: TrainConfig, model_config: GPTConfig | None, world: World | None = None, full_windows: bool = False
) -> str:
    """One line: device, precision (and why), threads, processes. `full_windows`: every row of a batch is
    a whole context window (pretraining), so a micro-batch's tokens are known."""
    world = world or launched_world()
    device = train_device(config, world)
    width = model_config.n_embd if model_config else None
    batch_tokens = None
    if full_windows and model_config:
        batch_tokens = StepSplit.plan(config, world).micro_batch_tokens(config.batch_size, model_config.block_size)
    threads = process_threads(config, world)
    return (
        f"device: {device}, {precision_reason(config.precision, device, width, batch_tokens)}"
        + (f", {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else "")
        + (f", {world.size} processes ({config.parallel})" if world.distributed else "")
        + (", torch.compile" if config.compile else "")
    )


def recover_run(run_dir: Path) -> None:
    """Undo what a kill in the middle of a save left in a run folder (see kiln.atomic.recover_dir)."""
    for name in ("last", "best"):
        recover_dir(Path(run_dir) / name)


def newest_checkpoint(run_dir: Path) -> Path:
    """The run's checkpoint to resume from: the one saved last of `last/` and `best/` that reads back
    whole (`last/` when it is sound); `last/` itself when neither is, for the stage to explain."""
    steps = {name: resumable_step(run_dir / name) for name in ("last", "best")}
    sound = [name for name in ("last", "best") if steps[name] is not None]
    return run_dir / (max(sound, key=lambda name: steps[name]) if sound else "last")


def train_model(
    model: nn.Module,
    optim_config: OptimConfig,
    config: TrainConfig,
    stage: Stage,
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_estimate: Callable[[int, float], None] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train `model` (its trainable parameters) as `stage` says, into `run_dir`.

    `on_step(step, loss)` is called after every step and `on_estimate(total_steps, seconds_left)` when
    the pace is measured, both on rank 0 only.
    """
    run_dir = Path(run_dir)
    world = world or launched_world()
    if not config.has_limit():
        raise ConfigError("give a limit: --max-iters, --max-tokens, --max-time or --epochs")
    split = StepSplit.plan(config, world)
    device = train_device(config, world)
    join(world, device)
    threads = set_threads(process_threads(config, world))
    shape = model_config_of(model)
    batch_tokens = (
        split.micro_batch_tokens(config.batch_size, shape.block_size) if shape and stage.tokens_per_step else None
    )
    amp = autocast_dtype(config.precision, device, shape.n_embd if shape else None, batch_tokens)
    total_steps = planned_steps(config, stage.steps_per_epoch, stage.tokens_per_step)

    if world.is_main:
        recover_run(run_dir)
    barrier(world, "recovering the run folder")
    state = None
    if resume:
        folder = newest_checkpoint(run_dir)
        state = stage.restore(folder, model)
        if world.is_main:
            damaged = f" ({run_dir / 'last'} does not read back whole)" if folder.name != "last" else ""
            print(f"resuming from {folder} at step {state.progress['step']:,}{damaged}")
    elif (run_dir / "last").exists():
        raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    check_optimizer_fits(optim_config, config.parallel, world)
    module = model.to(device)
    step_model, loss_factor = wrap_model(module, config.parallel, world, device)
    optimizers = build_optimizers(module, optim_config, fused=None if config.parallel == "ddp" else False)
    if state is not None:
        load_optimizer_states(module, optimizers, state.optimizers, config.parallel, world)
    if config.compile:
        step_model = torch.compile(step_model)
    trainable = [p for p in module.parameters() if p.requires_grad]
    peak = peak_flops(device, amp, threads)
    tokens_per_step = stage.tokens_per_step
    flops_per_step = flops_per_token(shape) * tokens_per_step if shape and tokens_per_step else None

    progress = state.progress if state else {}
    step = progress.get("step", 0)
    best_val = progress.get("best_val_loss", math.inf)
    last_val = progress.get("last_val_loss", math.inf)
    first_val = progress.get("first_val_loss")
    since_best = progress.get("evals_since_best", 0)
    saved_total = progress.get("total_steps")
    if resume and total_steps is None:
        # A time-limited run keeps the schedule length it calibrated, so the learning rate carries on.
        total_steps = saved_total
    restart = tuple(progress["schedule_restart"]) if progress.get("schedule_restart") else None
    if resume and saved_total and total_steps and total_steps != saved_total:
        # A new length: decay on from the factor reached, over the steps now left (docs/train.md).
        warmup = min(optim_config.warmup_iters, saved_total // 5)
        if step >= warmup:
            restart = (step, continued_lr_factor(step, saved_total, optim_config, restart))
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(world, "the start")
    metrics = MetricsLog(run_dir, step, config.log) if world.is_main else None

    start = time.perf_counter() - progress.get("elapsed_s", 0.0)
    evaluated_at = first_step = step
    # For fitting a time limit: wall time outside evaluations (so loading, logging and callbacks count),
    # and what the last evaluation-and-save cost.
    eval_clock = {"total": 0.0, "last": None}
    saved_at = {"last": None}  # the step whose weights last/ holds
    last_fit = (0, time.perf_counter())  # (steps into this session, wall time outside evaluations then)
    limit_steps = total_steps  # the iteration / token / epoch limit, which a time limit can only shorten
    step_seconds = 0.0  # time in training steps since the last evaluation, for tokens/s and MFU
    loss_since_eval = list(progress.get("step_losses_since_eval", []))  # for step_loss, the mean between evaluations
    calibrate = bool(config.max_time) and (not resume or total_steps is None)

    def training_state() -> TrainingState:
        return TrainingState(
            optimizers=optimizer_states(module, optimizers, config.parallel, world),
            progress={
                "step": step,
                "best_val_loss": best_val,
                "last_val_loss": last_val,
                "first_val_loss": first_val,
                "evals_since_best": since_best,
                "elapsed_s": time.perf_counter() - start,
                "total_steps": total_steps,
                "world_size": world.size,
                "step_losses_since_eval": loss_since_eval,
                "schedule_restart": restart,
            },
        )

    def save(folder: Path) -> None:
        state = training_state() if config.resumable else None
        saved = full_model_copy(module, config.parallel, world)
        if world.is_main:
            stage.save(folder, saved, state)
        barrier(world, "a checkpoint save")

    def evaluate_and_save() -> float:
        nonlocal best_val, last_val, since_best, first_val
        began = time.perf_counter()
        module.eval()
        with torch.no_grad(), _autocast(device, amp):
            scores = stage.evaluate(module)
        reshard(module, config.parallel, world)
        module.train()
        val_loss = scores["val_loss"]
        steps_timed = step - evaluated_at
        record = {
            "step": step,
            "epoch": step / stage.steps_per_epoch,
            **scores,
            "step_loss": sum(loss_since_eval) / len(loss_since_eval) if loss_since_eval else None,
            "lr": optimizers[-1].param_groups[0]["lr"],
            "tokens": step * tokens_per_step if tokens_per_step else None,
            "tokens_per_s": steps_timed * tokens_per_step / step_seconds if step_seconds and tokens_per_step else None,
            "mfu": steps_timed * flops_per_step / step_seconds / peak
            if step_seconds and peak and flops_per_step
            else None,
            "elapsed_s": time.perf_counter() - start,
        }
        loss_since_eval.clear()  # before the save: a resumed run starts its next mean afresh
        if metrics:
            metrics.write(record)
        improved = val_loss < best_val
        last_val, best_val = val_loss, min(best_val, val_loss)
        since_best = 0 if improved else since_best + 1
        if step == 0:
            first_val = val_loss
        # A run that cannot resume needs last/ only as the weights it ends with (written once the loop
        # is over) and as best/'s source: the writes of weights that neither improved nor end are saved.
        if config.resumable or improved:
            save(run_dir / "last")
            saved_at["last"] = step
        if improved:  # the same checkpoint: best/ takes hard links to last/'s files instead of a second write
            if world.is_main:
                linked_copy(run_dir / "last", run_dir / "best")
            barrier(world, "a checkpoint save")
        eval_clock["last"] = time.perf_counter() - began
        eval_clock["total"] += eval_clock["last"]
        return val_loss

    module.train()
    stopped_early = False
    if stage.evaluate_at_start and step == 0:
        evaluate_and_save()
    # A run that cannot be resumed has nothing to save on the way out: Ctrl-C stops it at once.
    asked, stop_catching = catch_stop_requests() if config.resumable else ([], lambda: None)
    # Sharded (FSDP) and compiled models manage their own weights; GPUs cast fast enough.
    cached_casts = device.type == "cpu" and config.parallel != "fsdp" and not config.compile
    uncast_weights = cast_frozen_weights(module, amp if cached_casts else None)
    # Nothing needs the gradients together (no clipping, no accumulation, one process): update each
    # weight as backward completes its gradient, and free it.
    alone = not optim_config.grad_clip and config.grad_accum == 1 and not world.distributed
    in_backward = UpdateInBackward(optimizers) if alone else None
    stopped_by = 0
    try:
        while total_steps is None or step < total_steps:
            if config.max_time:
                out_of_time = float(time.perf_counter() - start >= config.max_time)
                if world.distributed:  # every rank stops at the same step: rank 0's clock decides
                    out_of_time = float(broadcast_tensor(world, torch.tensor([out_of_time]))[0])
                if out_of_time:
                    break
            step_start = time.perf_counter()
            set_learning_rates(optimizers, continued_lr_factor(step, total_steps or 10**9, optim_config, restart))
            rows = stage.rows(step)
            micro = split.micro_rows(rows)
            batches = [stage.batch(r if len(r) else rows[:1]) for _, r in micro]
            if stage.tokens_per_step:  # full windows: every position is a target, no need to count
                global_units = stage.tokens_per_step
            else:
                units = [stage.units(b) if len(r) else 0 for b, (_, r) in zip(batches, micro, strict=True)]
                global_units = int(all_reduce_sum(world, torch.tensor([float(sum(units))], dtype=torch.float64))[0])
            if global_units == 0:
                raise KilnError(f"step {step + 1} has nothing to learn from (no target tokens); check the data")
            step_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
            for position, ((number, part), batch) in enumerate(zip(micro, batches, strict=True)):
                torch.manual_seed(_micro_seed(config.seed, step, number, 0 if split.by_accumulation else world.rank))
                last_micro = position == len(micro) - 1
                with sync_gradients(step_model, config.parallel, world, last_micro):
                    with _autocast(device, amp):
                        loss = stage.loss_sum(step_model, batch_to(batch, device))
                    weight = loss_factor * world.size / global_units if len(part) else 0.0
                    (loss * weight).backward()
                if len(part):  # a stand-in batch (a rank with no rows this step) adds nothing
                    step_loss += loss.detach()
            # The step's loss is summed over the ranks while the optimizer steps; a NaN is caught before
            # anything is saved, so `last/` stays the last good checkpoint.
            # The stop request rides along: every rank stops at the same step if any was asked to.
            summed = torch.tensor([float(step_loss), 1.0 if asked else 0.0], dtype=torch.float64)
            summed_loss = all_reduce_sum_later(world, summed)
            if optim_config.grad_clip:
                # foreach: one fused norm over all gradients instead of one small op per tensor.
                torch.nn.utils.clip_grad_norm_(trainable, optim_config.grad_clip, foreach=True)
            if in_backward is None:  # else backward has already updated each weight
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            reduced = summed_loss()
            loss_value, stop_asked = float(reduced[0]) / global_units, reduced[1] > 0
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step + 1}; {run_dir / 'last'} holds the last good checkpoint. "
                    f"Try a lower learning rate, e.g. --set lr={optim_config.lr / 3:.1e}"
                )
            step += 1
            loss_since_eval.append(loss_value)
            step_seconds += time.perf_counter() - step_start
            if _is_fit_point(step - first_step):
                outside_evals = time.perf_counter() - eval_clock["total"]
                per_step = (outside_evals - last_fit[1]) / (step - first_step - last_fit[0])
                last_fit = (step - first_step, outside_evals)
                # Before the first evaluation, guess it: 2 x eval_batches forward passes of ~1/3 step each.
                eval_seconds = eval_clock["last"] or 2 * config.eval_batches * per_step / 3
                per_step_with_evals = per_step + eval_seconds / config.eval_interval
                if calibrate:
                    # Fit the schedule to the time left, so the decay ends as time runs out.
                    left = config.max_time - (time.perf_counter() - start) - eval_seconds
                    by_time = step + max(1, int(left / per_step_with_evals))
                    total_steps = min(limit_steps, by_time) if limit_steps else by_time
                    total_steps = broadcast_object(world, total_steps)
                if on_estimate and total_steps and world.is_main:
                    on_estimate(total_steps, (total_steps - step) * per_step_with_evals + eval_seconds)
            if on_step and world.is_main:
                on_step(step, loss_value)
            done = total_steps is not None and step >= total_steps
            if step % config.eval_interval == 0 or done:
                evaluate_and_save()
                evaluated_at, step_seconds = step, 0.0
                if config.early_stop and since_best >= config.early_stop:
                    stopped_early = True
                    break
            if stop_asked:
                stopped_by = asked[0] if asked else signal.SIGTERM  # another rank was asked
                break
    finally:
        stop_catching()
        uncast_weights()
        if in_backward is not None:
            in_backward.remove()
    if stopped_by:
        if evaluated_at != step:
            save(run_dir / "last")
        raise TrainingStopped(signal.Signals(stopped_by).name, stopped_by, step, run_dir / "last")
    if evaluated_at != step:  # stopped by the clock between evaluations
        evaluate_and_save()
    if saved_at["last"] != step:
        save(run_dir / "last")
    if metrics:
        metrics.close()
    return TrainResult(
        steps=step,
        tokens=step * tokens_per_step if tokens_per_step else None,
        seconds=time.perf_counter() - start,
        first_val_loss=first_val,
        best_val_loss=best_val,
        last_val_loss=last_val,
        stopped_early=stopped_early,
        run_dir=run_dir,
    )
