"""Kiln's pretraining against nanoGPT's documented CPU run, in one process, on Tiny Shakespeare (char).

nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0, lr 1e-3 with 100
warmup steps and cosine decay to 1e-4 over 2,000 steps, AdamW (beta2 0.99, weight decay 0.1), gradient
clipping at 1, an evaluation of 20 batches every 250 steps. The baseline below is a plain eager fp32
PyTorch GPT of that recipe, written the way nanoGPT's model.py and train.py are: LayerNorm with biases,
learned positions, exact GELU, tied embeddings, scaled_dot_product_attention, the default (per-tensor)
AdamW and clip on CPU.

1. Speed. The baseline and `kiln.train.trainer.train` with the `nanogpt-cpu` preset and the same recipe
   run their 2,000 steps (evaluations and, for Kiln, checkpoints included) taking turns every 50 steps,
   so both see the same machine: a shared 2-core host drifts by 20-40% from minute to minute, which
   would swamp the comparison of two runs made one after the other. Each side's clock runs only on its
   turns. Bar: Kiln >= 1.25x the baseline's tokens/s.
2. Quality. Kiln's `shakespeare-cpu` preset trains alone for 66 s of wall time (nanoGPT's whole run
   takes 66 s here on a quiet machine). Bar: val loss <= 1.70 over 100 batches of the val split.

Final val losses of all three are measured on the same 100 fixed val batches. Prints a table; exits 1
if a bar fails. Run from the repository root:

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/pretrain_vs_nanogpt.py [--iters 2000] [--seconds 66]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kiln.checkpoint import load_checkpoint
from kiln.data.loaders import RandomWindows
from kiln.train.run import build_settings, training_data
from kiln.train.trainer import estimate_loss, train

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH, TURN_STEPS, VAL_BATCHES = 12, 50, 100
RECIPE = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, dropout=0.0)
SPEED_BAR, LOSS_BAR = 1.25, 1.70


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


def run_baseline(data, iters: int, clock: TurnClock, threads: int, out: dict) -> None:
    torch.set_num_threads(threads)
    clock.start()
    try:
        out["model"] = _baseline_loop(data, iters, clock)
    finally:  # on failure too, so the other side is not left waiting for its turn
        clock.stop()


def _baseline_loop(data, iters: int, clock: TurnClock) -> BaselineGPT:
    """nanoGPT's train.py loop, eager fp32."""
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
    for step in range(iters + 1):
        if step % 250 == 0:  # nanoGPT evaluates at step 0 and every eval_interval
            model.eval()
            with torch.no_grad():
                for tokens in (train_tokens, val_tokens):
                    [model(*get_batch(tokens))[1].item() for _ in range(20)]
            model.train()
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
    return model


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


def fixed_val_batches(data, block_size: int) -> list:
    loader = RandomWindows(data.tokens("val"), block_size, BATCH, seed=7, label="val")
    return [next(loader) for _ in range(VAL_BATCHES)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="steps of the side-by-side speed run")
    parser.add_argument("--seconds", type=float, default=66.0, help="wall time for the shakespeare-cpu run")
    args = parser.parse_args()
    data = training_data("tinyshakespeare", "char", os.environ.get("KILN_DATA_DIR"))
    threads = torch.get_num_threads()
    val_batches = fixed_val_batches(data, SHAPE["block_size"])

    with tempfile.TemporaryDirectory() as tmp:
        turns = Turns()
        baseline_out, kiln_out = {}, {}
        nanogpt_settings = {**RECIPE, **SHAPE, "batch_size": BATCH, "max_iters": args.iters}
        nanogpt_settings |= {"eval_interval": 250, "eval_batches": 20, "threads": threads}
        clocks = [TurnClock(turns, 0), TurnClock(turns, 1)]
        contestants = [
            threading.Thread(target=run_baseline, args=(data, args.iters, clocks[0], threads, baseline_out)),
            threading.Thread(
                target=run_kiln, args=(data, "nanogpt-cpu", nanogpt_settings, f"{tmp}/nanogpt", clocks[1], kiln_out)
            ),
        ]
        for thread in contestants:
            thread.start()
        for thread in contestants:
            thread.join()
        if "result" not in kiln_out or "model" not in baseline_out:
            print("a contestant failed; see the traceback above", file=sys.stderr)
            return 1
        tokens = args.iters * BATCH * SHAPE["block_size"]
        base_rate, kiln_rate = tokens / clocks[0].active, tokens / clocks[1].active

        cpu = torch.device("cpu")
        base_val = estimate_loss(baseline_out["model"], val_batches, cpu)
        kiln_val = estimate_loss(load_checkpoint(f"{tmp}/nanogpt/last").model, val_batches, cpu)
        # The preset alone: for the bar's 66 s, and for as long as the baseline's run took in this process.
        preset_runs = []
        for seconds in (args.seconds, clocks[0].active):
            out: dict = {}
            quality = {"max_time": seconds, "eval_interval": 10**9, "eval_batches": 10, "threads": threads}
            run_kiln(data, "shakespeare-cpu", quality, f"{tmp}/preset-{seconds:.0f}", None, out)
            model = load_checkpoint(f"{tmp}/preset-{seconds:.0f}/last").model
            val = estimate_loss(model, fixed_val_batches(data, out["settings"].model.block_size), cpu)
            preset_runs.append((out["result"], out["settings"], val))

    table = Table(title=f"Tiny Shakespeare (char), {threads} threads, torch {torch.__version__}")
    for column in ("run", "config", "steps", "tokens/s", "wall s", f"val loss ({VAL_BATCHES} batches)", "vs baseline"):
        table.add_column(column)
    shape = "4/4/128, block 64, batch 12"
    table.add_row(
        "baseline (nanoGPT recipe, eager fp32)",
        shape,
        f"{args.iters:,}",
        f"{base_rate:,.0f}",
        f"{clocks[0].active:.1f}",
        f"{base_val:.4f}",
        "1.00x",
    )
    table.add_row(
        "kiln nanogpt-cpu",
        shape,
        f"{args.iters:,}",
        f"{kiln_rate:,.0f}",
        f"{clocks[1].active:.1f}",
        f"{kiln_val:.4f}",
        f"{kiln_rate / base_rate:.2f}x",
    )
    for result, settings, val in preset_runs:
        cfg = settings.model
        described = (
            f"{cfg.block_style} {cfg.n_layer}/{cfg.n_head}/{cfg.n_embd}, block {cfg.block_size}, "
            f"batch {settings.train.batch_size}, lr {settings.optim.lr:g}"
        )
        table.add_row(
            f"kiln shakespeare-cpu, {settings.train.max_time:.0f} s",
            described,
            f"{result.steps:,}",
            f"{result.tokens / result.seconds:,.0f}",
            f"{result.seconds:.1f}",
            f"{val:.4f}",
            "",
        )
    preset_val = preset_runs[0][2]
    Console(width=200).print(table)
    speed_ok, loss_ok = kiln_rate / base_rate >= SPEED_BAR, preset_val <= LOSS_BAR
    print(
        f"speed bar (kiln >= {SPEED_BAR}x baseline tokens/s): {'PASS' if speed_ok else 'FAIL'} "
        f"({kiln_rate / base_rate:.2f}x)"
    )
    print(
        f"quality bar (shakespeare-cpu val <= {LOSS_BAR} in {args.seconds:.0f}s): {'PASS' if loss_ok else 'FAIL'} "
        f"({preset_val:.4f})"
    )
    return 0 if speed_ok and loss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
