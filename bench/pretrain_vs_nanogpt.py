"""Kiln's pretraining against nanoGPT's documented CPU run on Tiny Shakespeare (char): time to quality.

nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0, lr 1e-3 with 100
warmup steps and cosine decay to 1e-4 over 2,000 steps, AdamW (beta2 0.99, weight decay 0.1), gradient
clipping at 1, an evaluation of 20 batches every 250 steps. The baseline below is a plain eager fp32
PyTorch GPT of that recipe, written the way nanoGPT's model.py and train.py are: LayerNorm with biases,
learned positions, exact GELU, tied embeddings, scaled_dot_product_attention, the default (per-tensor)
AdamW and clip on CPU.

Every val loss is the loss over the whole val split in non-overlapping windows of the model's context
(64 tokens for the baseline and for shakespeare-cpu): what `kiln evaluate --data tinyshakespeare`
reports. Kiln's runs are scored on their best/.

1. The baseline alone: its 2,000 steps; T is the wall time of its training steps (evaluations left
   out), measured in this run, so every budget below follows this machine's speed of the moment.
2. Time to the baseline's quality: Kiln's best CPU preset (shakespeare-cpu) with `--max-time` T/6 and
   T/4 (and T/3 when neither gets there). Bar: the T/4 run reaches the baseline's val loss; goal: T/6.
3. Best quality in 5T: --long-preset with `--max-time` 5T. Bar: val <= 1.50; goal <= 1.47 (nanoGPT's
   documented figure for its Shakespeare model on an A100).
4. For information: the same-shape speed, Kiln's nanogpt-cpu preset and the baseline taking turns every
   50 steps for --speed-steps steps in one process, each clock running only on its own turns.

Prints a table; exits 1 if a bar fails. About 10 minutes on 2 cores. From the repository root:

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/pretrain_vs_nanogpt.py [--long-preset NAME]

--long-preset defaults to shakespeare-cpu-long (4/4/128 at context 128), the best of the shapes tried
for a budget of about 5 minutes (kiln/model/presets.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kiln.checkpoint import load_checkpoint
from kiln.evaluate.perplexity import token_metrics
from kiln.train.run import build_settings, training_data
from kiln.train.trainer import train

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH, TURN_STEPS = 12, 50
RECIPE = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, dropout=0.0)
TIME_BAR, TIME_GOAL, LOSS_BAR, LOSS_GOAL, LONG_BUDGET = 1 / 4, 1 / 6, 1.50, 1.47, 5


class BaselineBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class BaselineGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)  # as nanoGPT's GPT keeps its config
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(BaselineBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class Turns:
    """Two threads that take turns: one computes while the other waits, so both meet the same machine."""

    def __init__(self):
        self.condition = threading.Condition()
        self.holder, self.finished = 0, set()

    def wait(self, me: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.holder == me or (1 - me) in self.finished)

    def pass_on(self, me: int) -> None:
        with self.condition:
            self.holder = 1 - me
            self.condition.notify_all()

    def finish(self, me: int) -> None:
        with self.condition:
            self.finished.add(me)
            self.holder = 1 - me
            self.condition.notify_all()


class TurnClock:
    """Counts one side's time on its own turns only."""

    def __init__(self, turns: Turns, me: int):
        self.turns, self.me, self.active, self.resumed = turns, me, 0.0, 0.0

    def start(self) -> None:
        self.turns.wait(self.me)
        self.resumed = time.perf_counter()

    def yield_turn(self) -> None:
        self.active += time.perf_counter() - self.resumed
        self.turns.pass_on(self.me)
        self.start()

    def stop(self) -> None:
        self.active += time.perf_counter() - self.resumed
        self.turns.finish(self.me)


def lr_at(step: int, iters: int) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters = iters."""
    lr, min_lr, warmup = RECIPE["lr"], RECIPE["min_lr"], RECIPE["warmup_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    ratio = (step - warmup) / (iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class Alone:
    """The clock of a side that runs by itself: wall time from start to stop, no turns."""

    def start(self) -> None:
        self.resumed = time.perf_counter()

    def yield_turn(self) -> None:
        pass

    def stop(self) -> None:
        self.active = time.perf_counter() - self.resumed


def run_baseline(data, iters: int, clock, threads: int, out: dict) -> None:
    torch.set_num_threads(threads)
    clock.start()
    try:
        out["model"], out["eval_seconds"] = _baseline_loop(data, iters, clock)
    finally:  # on failure too, so the other side is not left waiting for its turn
        clock.stop()


def _baseline_loop(data, iters: int, clock) -> tuple[BaselineGPT, float]:
    """nanoGPT's train.py loop, eager fp32. Returns the model and the seconds its evaluations took."""
    torch.manual_seed(1337)
    batches = torch.Generator().manual_seed(1337)  # its own stream: the other thread reseeds the global one
    train_tokens = torch.from_numpy(data.tokens("train").astype("int64"))
    val_tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    block = SHAPE["block_size"]

    def get_batch(tokens):
        ix = torch.randint(len(tokens) - block, (BATCH,), generator=batches)
        return torch.stack([tokens[i : i + block] for i in ix]), torch.stack(
            [tokens[i + 1 : i + 1 + block] for i in ix]
        )

    model = BaselineGPT(data.tokenizer.vocab_size, **SHAPE)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": RECIPE["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=RECIPE["lr"], betas=(0.9, RECIPE["beta2"]))
    eval_seconds = 0.0
    for step in range(iters + 1):
        if step % 250 == 0:  # nanoGPT evaluates at step 0 and every eval_interval
            began = time.perf_counter()
            model.eval()
            with torch.no_grad():
                for tokens in (train_tokens, val_tokens):
                    [model(*get_batch(tokens))[1].item() for _ in range(20)]
            model.train()
            eval_seconds += time.perf_counter() - began
        if step == iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, iters)
        _, loss = model(*get_batch(train_tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if (step + 1) % TURN_STEPS == 0:
            clock.yield_turn()
    return model, eval_seconds


def run_kiln(data, preset: str, settings: dict, run_dir: str, clock: TurnClock | None, out: dict) -> None:
    run = build_settings(preset, data.tokenizer.vocab_size, settings, {})
    if clock:
        clock.start()

    def on_step(step: int, loss: float) -> None:
        if clock and step % TURN_STEPS == 0:
            clock.yield_turn()

    try:
        out["result"] = train(run.model, run.optim, run.train, data, run_dir, on_step=on_step)
        out["settings"] = run
    finally:
        if clock:
            clock.stop()


def train_alone(data, preset: str, seconds: float, run_dir: str, threads: int) -> dict:
    """One Kiln run of `preset` for `seconds`, its best/ scored as `kiln evaluate` scores the val split."""
    out: dict = {}
    began = time.perf_counter()
    run_kiln(data, preset, {"max_time": seconds, "threads": threads}, run_dir, None, out)
    wall = time.perf_counter() - began
    model = load_checkpoint(f"{run_dir}/best").model
    val = token_metrics(model, data.tokenizer, data.tokens("val")).loss
    return {"preset": preset, "budget": seconds, "wall": wall, "val": val, "model": model.config, **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="the baseline's steps (nanoGPT's recipe: 2,000)")
    parser.add_argument("--preset", default="shakespeare-cpu", help="Kiln's preset for the time to quality")
    parser.add_argument("--long-preset", default="shakespeare-cpu-long", help="Kiln's preset for the 5T run")
    parser.add_argument("--speed-steps", type=int, default=500, help="steps of the same-shape speed run")
    args = parser.parse_args()
    data = training_data("tinyshakespeare", "char", os.environ.get("KILN_DATA_DIR"))
    threads = torch.get_num_threads()
    console = Console(width=200)

    with tempfile.TemporaryDirectory() as tmp:
        alone, baseline = Alone(), {}
        run_baseline(data, args.iters, alone, threads, baseline)
        T = alone.active - baseline["eval_seconds"]
        # The same windows and sum as Kiln's runs: token_metrics takes any model that returns (logits, loss).
        base_val = token_metrics(baseline["model"], data.tokenizer, data.tokens("val")).loss
        console.print(f"baseline: {args.iters:,} steps in {T:.1f} s of training (T), val {base_val:.4f}")

        runs = []
        for fraction in (TIME_GOAL, TIME_BAR, 1 / 3):
            runs.append(train_alone(data, args.preset, T * fraction, f"{tmp}/t{len(runs)}", threads))
            runs[-1]["label"] = f"T/{round(1 / fraction)}"
            console.print(f"{args.preset}, {runs[-1]['label']}: val {runs[-1]['val']:.4f}")
            if runs[-1]["val"] <= base_val and fraction >= TIME_BAR:
                break
        long = train_alone(data, args.long_preset, LONG_BUDGET * T, f"{tmp}/long", threads)
        long["label"] = f"{LONG_BUDGET}T"

        turns = Turns()
        clocks, kiln_out, turn_base = [TurnClock(turns, 0), TurnClock(turns, 1)], {}, {}
        same_shape = {**RECIPE, **SHAPE, "batch_size": BATCH, "max_iters": args.speed_steps}
        same_shape |= {"eval_interval": 250, "eval_batches": 20, "threads": threads}
        contestants = [
            threading.Thread(target=run_baseline, args=(data, args.speed_steps, clocks[0], threads, turn_base)),
            threading.Thread(
                target=run_kiln, args=(data, "nanogpt-cpu", same_shape, f"{tmp}/nanogpt", clocks[1], kiln_out)
            ),
        ]
        for thread in contestants:
            thread.start()
        for thread in contestants:
            thread.join()
        if "result" not in kiln_out or "model" not in turn_base:
            print("a contestant failed; see the traceback above", file=sys.stderr)
            return 1
    speed = clocks[0].active / clocks[1].active

    table = Table(title=f"Tiny Shakespeare (char), {threads} threads, torch {torch.__version__}; T = {T:.1f} s")
    for column in ("run", "model", "budget", "steps", "tokens/s", "wall s", "val loss (whole split)", "vs baseline"):
        table.add_column(column)
    table.add_row(
        "baseline (nanoGPT recipe, eager fp32)",
        "gpt2 4/4/128, block 64, batch 12, lr 1e-3",
        f"{args.iters:,} steps",
        f"{args.iters:,}",
        f"{args.iters * BATCH * SHAPE['block_size'] / T:,.0f}",
        f"{T:.1f}",
        f"{base_val:.4f}",
        "",
    )
    for run in (*runs, long):
        cfg, result = run["model"], run["result"]
        table.add_row(
            f"kiln {run['preset']}",
            f"{cfg.block_style} {cfg.n_layer}/{cfg.n_head}/{cfg.n_embd}, block {cfg.block_size}, "
            f"batch {run['settings'].train.batch_size}, lr {run['settings'].optim.lr:g}",
            f"{run['label']} = {run['budget']:.1f} s",
            f"{result.steps:,}",
            f"{result.tokens / result.seconds:,.0f}",
            f"{run['wall']:.1f}",
            f"{run['val']:.4f}",
            f"{'reached' if run['val'] <= base_val else 'not reached'}",
        )
    console.print(table)
    print(
        f"same shape, for information: kiln nanogpt-cpu {speed:.2f}x the baseline's tokens/s "
        f"({args.speed_steps} steps each, taking turns every {TURN_STEPS})"
    )
    reached = [run for run in runs if run["val"] <= base_val]
    soonest = min((run["budget"] for run in reached), default=None)
    time_ok = soonest is not None and soonest <= TIME_BAR * T * 1.001
    goal = soonest is not None and soonest <= TIME_GOAL * T * 1.001
    print(
        f"time bar (baseline's val {base_val:.4f} within T/4 = {TIME_BAR * T:.1f} s): {'PASS' if time_ok else 'FAIL'}"
        + (
            f" (reached in {soonest:.1f} s = T/{T / soonest:.1f}; goal T/6 {'met' if goal else 'missed'})"
            if soonest
            else ""
        )
    )
    loss_ok, loss_goal = long["val"] <= LOSS_BAR, long["val"] <= LOSS_GOAL
    print(
        f"quality bar ({args.long_preset} val <= {LOSS_BAR} within {LONG_BUDGET}T = {LONG_BUDGET * T:.0f} s): "
        f"{'PASS' if loss_ok else 'FAIL'} ({long['val']:.4f}; goal {LOSS_GOAL} {'met' if loss_goal else 'missed'})"
    )
    return 0 if time_ok and loss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
