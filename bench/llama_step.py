"""What Kiln's hand-written RMSNorm and RoPE backwards buy on a CPU training step.

On CPU, torch computes RMSNorm as a chain of element-wise operations and RoPE (transformers' form:
x * cos + rotate_half(x) * sin) as a negation, a concatenation and three more, and autograd then
differentiates every one of them. kiln.model.gpt writes both backwards out (RoPE's is the same rotation
by the opposite angle) and rotates queries and keys in one pass. This script times, in turns in one
process (this shared 2-vCPU host drifts by 20-40% from minute to minute):

- each part alone, forward and backward, at the shakespeare-cpu preset's shapes;
- the whole preset's training step (AdamW, clipping), with Kiln's forms and with torch's forms patched
  back in, from the same initial weights; their losses over the first steps must agree.

Run from the repository root:

    .venv/bin/python bench/llama_step.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from step_floor import step_runner, time_steps  # noqa: E402

from kiln.model import gpt  # noqa: E402
from kiln.model.presets import preset_config  # noqa: E402

BATCH, VOCAB = 12, 65  # the preset's batch; Tiny Shakespeare's characters


def rope_by_concatenation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@contextlib.contextmanager
def torch_forms():
    """Kiln's model with torch's RMSNorm and the concatenation form of RoPE, as before the change."""
    saved = gpt.RMSNorm.forward, gpt.apply_rope
    gpt.RMSNorm.forward, gpt.apply_rope = torch.nn.RMSNorm.forward, rope_by_concatenation
    try:
        yield
    finally:
        gpt.RMSNorm.forward, gpt.apply_rope = saved


def part_runners(config: gpt.GPTConfig) -> list[tuple[str, object, object]]:
    """(name, torch's form, Kiln's form) for one layer's worth of each part, forward and backward."""
    T, C, heads = config.block_size, config.n_embd, config.n_head + config.kv_heads
    x, grad = torch.randn(BATCH, T, C, requires_grad=True), torch.randn(BATCH, T, C)
    torch_norm, kiln_norm = torch.nn.RMSNorm(C, eps=config.norm_eps), gpt.RMSNorm(C, eps=config.norm_eps)
    cos, sin = (t.unsqueeze(1) for t in gpt.rope_tables(config, T))
    qk, grad_qk = (
        torch.randn(BATCH, T, heads, config.head_dim, requires_grad=True),
        torch.randn(BATCH, T, heads, config.head_dim),
    )
    # Before the change queries and keys were rotated separately, as (batch, heads, time, head_dim).
    q, k = (t.detach().transpose(1, 2).requires_grad_() for t in qk.split([config.n_head, config.kv_heads], dim=2))
    grad_q, grad_k = (t.transpose(1, 2) for t in grad_qk.split([config.n_head, config.kv_heads], dim=2))
    cos_bhtd, sin_bhtd = gpt.rope_tables(config, T)

    def rope_before():
        rotated = (rope_by_concatenation(q, cos_bhtd, sin_bhtd), rope_by_concatenation(k, cos_bhtd, sin_bhtd))
        torch.autograd.grad(rotated, (q, k), (grad_q, grad_k))

    return [
        (
            "RMSNorm, forward + backward",
            lambda: torch.autograd.grad(torch_norm(x), (x, torch_norm.weight), grad),
            lambda: torch.autograd.grad(kiln_norm(x), (x, kiln_norm.weight), grad),
        ),
        (
            "RoPE on queries and keys, forward + backward",
            rope_before,
            lambda: torch.autograd.grad(gpt.apply_rope(qk, cos, sin), qk, grad_qk),
        ),
    ]


def time_calls(run, count: int = 20) -> float:
    for _ in range(3):
        run()
    began = time.perf_counter()
    for _ in range(count):
        run()
    return (time.perf_counter() - began) / count


def model_step(config: gpt.GPTConfig, patched: bool):
    torch.manual_seed(0)
    model = gpt.GPT(config)
    step = step_runner(model, torch.optim.AdamW(model.parameters(), lr=5e-3, fused=True), foreach_clip=True)
    losses = []

    def run():
        with torch_forms() if patched else contextlib.nullcontext():
            losses.append(step())

    return run, losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="turns each form takes")
    args = parser.parse_args()
    config = preset_config("shakespeare-cpu", vocab_size=VOCAB)
    parts = part_runners(config)
    torch_step, torch_losses = model_step(config, patched=True)
    kiln_step, kiln_losses = model_step(config, patched=False)
    for step in (torch_step, kiln_step):
        time_steps(step, 20)
    worst = max(abs(a - b) for a, b in zip(torch_losses, kiln_losses, strict=True))

    timings: dict[str, tuple[list, list]] = {name: ([], []) for name, _, _ in parts}
    timings["whole training step"] = ([], [])
    for _ in range(args.rounds):
        for name, before, after in parts:
            timings[name][0].append(time_calls(before))
            timings[name][1].append(time_calls(after))
        timings["whole training step"][0].append(time_steps(torch_step, 5))
        timings["whole training step"][1].append(time_steps(kiln_step, 5))

    table = Table(
        title=f"shakespeare-cpu (llama 2/4/128, block 64, batch {BATCH}), fp32, {torch.get_num_threads()} threads"
    )
    for column in ("", "torch's forms, us", "Kiln's, us", "speed-up"):
        table.add_column(column)
    for name, (before, after) in timings.items():
        ratio = statistics.median(b / a for b, a in zip(before, after, strict=True))
        table.add_row(
            name, f"{statistics.median(before) * 1e6:.0f}", f"{statistics.median(after) * 1e6:.0f}", f"{ratio:.3f}x"
        )
    Console(width=140).print(table)
    print(f"largest loss difference over the first 20 steps from the same weights: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
