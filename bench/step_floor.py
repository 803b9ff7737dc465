"""How fast can one training step of nanoGPT's CPU shape be on this machine? The kernels' floor.

The step of nanoGPT's CPU recipe (gpt2 blocks 4/4/128, block 64, batch 12, fp32) is a fixed list of
kernels: the matrix products of every Linear forward and backward, attention (SDPA) forward and backward,
GELU, LayerNorm, the residual adds, cross-entropy, the embedding gather and scatter, clipping and one
fused AdamW update. This script times each of those kernels alone, in a hot loop at the same shapes and
thread count, and adds them up: no Python, no autograd bookkeeping, no allocator, caches warm. That sum
is a floor for the step's time, so `baseline step / floor` bounds the speed-up that any implementation of
the same fp32 arithmetic can reach here without faster kernels (a lower precision, a faster matmul
library, a different CPU).

The baseline step (bench/pretrain_vs_nanogpt.py's model and loop) and Kiln's step (the same model in
kiln.model.gpt, fused AdamW, foreach clipping) are timed in the same process, taking turns with the
kernel loop in short blocks, because this shared 2-vCPU host drifts by 20-40% from minute to minute.
A third contender, Kiln's model with its backward written out through the same kernels and no autograd
(gradients checked against autograd's first), shows how much of the step's excess over the floor is
Python and autograd bookkeeping; the time its matrix products take in place, set against the same
products in hot loops, shows how much is the kernels meeting cold operands.
Run from the repository root:

    .venv/bin/python bench/step_floor.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_vs_nanogpt import BATCH, SHAPE, BaselineGPT  # noqa: E402

from kiln.model.gpt import GPT, GPTConfig  # noqa: E402

VOCAB = 65  # Tiny Shakespeare's characters
aten = torch.ops.aten
ROWS = BATCH * SHAPE["block_size"]  # 768 token positions per step


def linear_kernels(n_in: int, n_out: int, bias: bool) -> list:
    """Forward product (with the bias fused, as addmm does), then the backward's products and bias sum."""
    x, w, b, g = torch.randn(ROWS, n_in), torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(ROWS, n_out)
    kernels = [
        ("matmul: Linear forward", (lambda: torch.addmm(b, x, w.t())) if bias else (lambda: x @ w.t())),
        ("matmul: Linear backward (input)", lambda: g @ w),
        ("matmul: Linear backward (weight)", lambda: g.t() @ x),
    ]
    if bias:
        kernels.append(("bias gradients", lambda: g.sum(0)))
    return kernels


def attention_kernel() -> tuple:
    """SDPA forward and backward through autograd (the flash kernel for CPU and its backward)."""
    heads, T = SHAPE["n_head"], SHAPE["block_size"]
    shape = (BATCH, heads, T, SHAPE["n_embd"] // heads)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def run():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(y, (q, k, v), grad)

    return "attention (SDPA forward + backward)", run


def step_kernels(params: list[torch.nn.Parameter]) -> list:
    """Every kernel of one step, once per use."""
    C, hidden = SHAPE["n_embd"], 4 * SHAPE["n_embd"]
    h, gh = torch.randn(ROWS, hidden), torch.randn(ROWS, hidden)
    x, gx, w, b = torch.randn(ROWS, C), torch.randn(ROWS, C), torch.randn(C), torch.randn(C)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], w, b, 1e-5)
    norm = [
        ("LayerNorm forward", lambda: torch.ops.aten.native_layer_norm(x, [C], w, b, 1e-5)),
        (
            "LayerNorm backward",
            lambda: torch.ops.aten.native_layer_norm_backward(gx, x, [C], mean, rstd, w, b, [True, True, True]),
        ),
    ]
    kernels = []
    for _ in range(SHAPE["n_layer"]):
        kernels += linear_kernels(C, 3 * C, True)
        kernels += linear_kernels(C, C, True)
        kernels += linear_kernels(C, hidden, True)
        kernels += linear_kernels(hidden, C, True)
        kernels.append(attention_kernel())
        kernels += [("GELU forward", lambda: F.gelu(h)), ("GELU backward", lambda: torch.ops.aten.gelu_backward(gh, h))]
        kernels += norm + norm + [("residual adds", lambda: x + gx)] * 2
    kernels += linear_kernels(C, VOCAB, False) + norm  # the tied head and the final norm

    logits = torch.randn(ROWS, VOCAB, requires_grad=True)
    targets, idx = torch.randint(0, VOCAB, (ROWS,)), torch.randint(0, VOCAB, (ROWS,))
    table = torch.randn(VOCAB, C)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def clip():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, 1.0 / (total + 1e-6))

    def embeddings():  # token and position tables: a gather forward, a scatter-add backward
        return table[idx], torch.ops.aten.embedding_dense_backward(gx, idx, VOCAB, -1, False)

    kernels += [
        ("cross-entropy (forward + backward)", lambda: torch.autograd.grad(F.cross_entropy(logits, targets), logits)),
        ("embeddings (gather + scatter)", embeddings),
        ("embeddings (gather + scatter)", embeddings),
        ("gradient clipping (foreach)", clip),
        ("AdamW update (fused)", optimizer.step),
    ]
    return kernels


def time_kernels(kernels: list, repeats: int = 20) -> dict[str, float]:
    """Seconds per step spent in each kind of kernel, each kernel timed alone in a hot loop."""
    spent: dict[str, float] = {}
    for name, run in kernels:
        for _ in range(3):
            run()
        began = time.perf_counter()
        for _ in range(repeats):
            run()
        spent[name] = spent.get(name, 0.0) + (time.perf_counter() - began) / repeats
    return spent


def step_runner(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    foreach_clip: bool,
    written_out: StepWithoutAutograd | None = None,
):
    """One training step on random tokens, through autograd or through `written_out`'s backward (whose
    gradient buffers live across steps: it overwrites them, so they are not cleared)."""
    generator = torch.Generator().manual_seed(0)

    def step():
        x = torch.randint(0, VOCAB, (BATCH, SHAPE["block_size"]), generator=generator)
        if written_out is None:
            _, loss = model(x, x.roll(-1, 1))
            loss.backward()
        else:
            loss = written_out.loss_and_gradients(x, x.roll(-1, 1))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach_clip or None)
        optimizer.step()
        if written_out is None:
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


class StepWithoutAutograd:
    """The same step with its backward written out through the kernels autograd calls (addmm and mm,
    SDPA's CPU flash kernel and its backward, LayerNorm's, GELU's, cross-entropy's), straight into
    gradient buffers allocated once: no autograd graph, no Python per operation beyond the call itself.
    It also adds up the time its matrix products take in place, with operands as cold as a real step
    leaves them, to set against the same products timed in a hot loop."""

    def __init__(self, model: GPT):
        self.model, self.eps, self.timing, self.matmul_seconds = model, model.config.norm_eps, False, 0.0
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    def _product(self, fn, *args, **kwargs):
        if not self.timing:
            return fn(*args, **kwargs)
        began = time.perf_counter()
        out = fn(*args, **kwargs)
        self.matmul_seconds += time.perf_counter() - began
        return out

    def _linear_backward(self, grad: torch.Tensor, inputs: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
        self._product(torch.mm, grad.t(), inputs, out=linear.weight.grad)
        torch.sum(grad, 0, out=linear.bias.grad)
        return self._product(torch.mm, grad, linear.weight)

    def _norm_backward(self, grad, inputs, mean, rstd, norm: torch.nn.LayerNorm) -> torch.Tensor:
        grad_in, grad_w, grad_b = aten.native_layer_norm_backward(
            grad, inputs, [inputs.shape[-1]], mean, rstd, norm.weight, norm.bias, [True, True, True]
        )
        norm.weight.grad.copy_(grad_w)
        norm.bias.grad.copy_(grad_b)
        return grad_in

    @torch.no_grad()
    def loss_and_gradients(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m, eps, mm, addmm = self.model, self.eps, torch.mm, torch.addmm
        (B, T), C, H = idx.shape, m.config.n_embd, m.config.n_head
        N, flat_idx, flat_targets = B * T, idx.reshape(-1), targets.reshape(-1)
        x = aten.embedding(m.wte.weight, flat_idx) + m.wpe.weight[:T].repeat(B, 1)
        saved = []
        for block in m.blocks:
            attn, mlp = block.attn, block.mlp
            normed1, mean1, rstd1 = aten.native_layer_norm(x, [C], block.norm1.weight, block.norm1.bias, eps)
            qkv = self._product(addmm, attn.qkv.bias, normed1, attn.qkv.weight.t())
            q, k, v = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
            heads_out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
            merged = heads_out.transpose(1, 2).reshape(N, C)
            x2 = self._product(addmm, x, merged, attn.proj.weight.t()).add_(attn.proj.bias)
            normed2, mean2, rstd2 = aten.native_layer_norm(x2, [C], block.norm2.weight, block.norm2.bias, eps)
            hidden = self._product(addmm, mlp.up.bias, normed2, mlp.up.weight.t())
            activated = F.gelu(hidden)
            out = self._product(addmm, x2, activated, mlp.down.weight.t()).add_(mlp.down.bias)
            saved.append(SimpleNamespace(x=x, normed1=normed1, mean1=mean1, rstd1=rstd1, q=q, k=k, v=v, x2=x2))
            saved[-1].__dict__.update(heads_out=heads_out, logsumexp=logsumexp, merged=merged, normed2=normed2)
            saved[-1].__dict__.update(mean2=mean2, rstd2=rstd2, hidden=hidden, activated=activated)
            x = out
        normed_f, mean_f, rstd_f = aten.native_layer_norm(x, [C], m.norm_f.weight, m.norm_f.bias, eps)
        table = m.wte.weight
        log_probs = torch.log_softmax(self._product(mm, normed_f, table.t()), 1)
        loss = aten.nll_loss(log_probs, flat_targets, None, 1, -100)

        grad_nll = aten.nll_loss_backward(
            torch.ones(()), log_probs, flat_targets, None, 1, -100, torch.tensor(float(N))
        )
        grad_logits = aten._log_softmax_backward_data(grad_nll, log_probs, 1, torch.float32)
        self._product(mm, grad_logits.t(), normed_f, out=table.grad)
        grad = self._norm_backward(self._product(mm, grad_logits, table), x, mean_f, rstd_f, m.norm_f)
        for block, s in zip(reversed(m.blocks), reversed(saved), strict=True):
            grad_activated = self._linear_backward(grad, s.activated, block.mlp.down)
            grad_hidden = aten.gelu_backward(grad_activated, s.hidden)
            grad_normed2 = self._linear_backward(grad_hidden, s.normed2, block.mlp.up)
            grad = grad + self._norm_backward(grad_normed2, s.x2, s.mean2, s.rstd2, block.norm2)
            grad_merged = self._linear_backward(grad, s.merged, block.attn.proj)
            grad_heads = grad_merged.view(B, T, H, C // H).transpose(1, 2)
            grad_qkv = torch.empty(B, T, 3, H, C // H)
            for into, part in zip(
                grad_qkv.permute(2, 0, 3, 1, 4).unbind(0),
                aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_heads, s.q, s.k, s.v, s.heads_out, s.logsumexp, 0.0, True
                ),
                strict=True,
            ):
                into.copy_(part)
            grad_normed1 = self._linear_backward(grad_qkv.view(N, 3 * C), s.normed1, block.attn.qkv)
            grad = grad + self._norm_backward(grad_normed1, s.x, s.mean1, s.rstd1, block.norm1)
        table.grad += aten.embedding_dense_backward(grad, flat_idx, table.shape[0], -1, False)
        torch.sum(grad.view(B, T, C), 0, out=m.wpe.weight.grad)
        return loss


def check_gradients(step: StepWithoutAutograd) -> None:
    """The written-out backward must give autograd's gradients, or its timings mean nothing."""
    idx = torch.randint(0, VOCAB, (BATCH, SHAPE["block_size"]), generator=torch.Generator().manual_seed(1))
    written = step.loss_and_gradients(idx, idx.roll(-1, 1))
    written_grads = [p.grad.clone() for p in step.model.parameters()]
    reference = copy.deepcopy(step.model)
    _, loss = reference(idx, idx.roll(-1, 1))
    loss.backward()
    torch.testing.assert_close(written, loss.detach())
    for mine, theirs in zip(written_grads, reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-4, atol=1e-6)


def time_steps(step, count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - began) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="turns each of baseline, Kiln and the kernels take")
    args = parser.parse_args()
    torch.manual_seed(0)
    baseline = BaselineGPT(VOCAB, **SHAPE)
    decay = [p for p in baseline.parameters() if p.dim() >= 2]
    rest = [p for p in baseline.parameters() if p.dim() < 2]
    baseline_step = step_runner(
        baseline,
        torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest}], lr=1e-3, betas=(0.9, 0.99)),
        foreach_clip=False,
    )
    kiln = GPT(GPTConfig(vocab_size=VOCAB, **SHAPE, dropout=0.0))
    kiln_step = step_runner(kiln, torch.optim.AdamW(kiln.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True), True)
    kernels = step_kernels([torch.nn.Parameter(p.detach().clone()) for p in baseline.parameters()])
    written = StepWithoutAutograd(GPT(GPTConfig(vocab_size=VOCAB, **SHAPE, dropout=0.0)))
    check_gradients(written)
    written_optimizer = torch.optim.AdamW(written.model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    written_step = step_runner(written.model, written_optimizer, True, written_out=written)

    for step in (baseline_step, kiln_step, written_step):
        time_steps(step, 10)
    baseline_times, kiln_times, written_times, in_place, floors, parts = [], [], [], [], [], []
    for _ in range(args.rounds):
        baseline_times.append(time_steps(baseline_step, 10))
        spent = time_kernels(kernels)
        parts.append(spent)
        floors.append(sum(spent.values()))
        kiln_times.append(time_steps(kiln_step, 10))
        written.timing, written.matmul_seconds = True, 0.0
        written_times.append(time_steps(written_step, 10))
        in_place.append(written.matmul_seconds / 10)
        written.timing = False

    base, floor = statistics.median(baseline_times), statistics.median(floors)
    ceiling = statistics.median(b / f for b, f in zip(baseline_times, floors, strict=True))
    kiln_ratio = statistics.median(b / k for b, k in zip(baseline_times, kiln_times, strict=True))
    table = Table(title=f"One step of gpt2 4/4/128, block 64, batch 12, fp32, {torch.get_num_threads()} threads")
    for column in ("kernels", "ms per step", "share of the baseline step"):
        table.add_column(column)
    for name in parts[0]:
        ms = statistics.median(p[name] for p in parts) * 1e3
        table.add_row(name, f"{ms:.2f}", f"{ms / base / 1e3:.0%}")
    table.add_row("all kernels: the floor", f"{floor * 1e3:.2f}", f"{floor / base:.0%}", style="bold")
    table.add_row("baseline step (nanoGPT's model and loop)", f"{base * 1e3:.2f}", "100%")
    table.add_row("kiln step", f"{statistics.median(kiln_times) * 1e3:.2f}", f"{1 / kiln_ratio:.0%}")
    written_ratio = statistics.median(b / w for b, w in zip(baseline_times, written_times, strict=True))
    table.add_row(
        "kiln's model, backward written out (no autograd)",
        f"{statistics.median(written_times) * 1e3:.2f}",
        f"{1 / written_ratio:.0%}",
    )
    Console(width=160).print(table)
    print(f"kiln: {kiln_ratio:.2f}x the baseline's speed; the kernels' floor allows at most {ceiling:.2f}x")
    print(f"the step with its backward written out, no autograd: {written_ratio:.2f}x the baseline's speed")
    hot = statistics.median(sum(v for k, v in p.items() if k.startswith("matmul")) for p in parts)
    print(
        f"its matrix products took {statistics.median(in_place) * 1e3:.2f} ms per step in place, "
        f"against {hot * 1e3:.2f} ms for the same products in hot loops"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
