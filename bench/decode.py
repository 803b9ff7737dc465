"""Decoding speed on a CPU: Kiln against transformers' `generate`, on the same weights, in one process.

The model is a 124M-shape GPT-2 (12 layers, 12 heads, 768 wide, vocabulary 50,257, block 1,024) with
seeded random weights, saved as a Kiln checkpoint and exported with Kiln's own `kiln export --to hf`
path (or give --checkpoint). Each of --rounds rounds runs every side once, in turn, so the drift of a
shared machine falls on all of them; a figure is the median over rounds, and a ratio the median of the
rounds' own ratios.

Batch 1, greedy, --tokens new tokens after the same prompt:
- Kiln before: fp32, plain `nn.Linear`, the decoding `kiln sample` did before; its text is the reference.
- Kiln default (`kiln sample`, `--precision auto`): on an x86 CPU, for weights this big, fp16 weights
  widened to fp32 inside fbgemm's product, fp32 activations (kiln.model.packed.decoding_precision).
- Kiln `--precision fp32`: each weight stored transposed for a row-times-matrix product.
- Kiln `--precision bf16`: bf16 weights prepacked for oneDNN.
- transformers `generate` on the exported folder, fp32, called as a user would.
The bar is judged on Kiln's default (the exit status) and shown for its fastest option ("best").
Each side's share of the memory-bandwidth bound: the bytes of weights a step reads (every layer but the
embedding tables, of which a step reads one row; the tied head is read whole) times its tokens/s, over
a read bandwidth measured each round (the sum of a 512 MiB fp32 tensor, best of 5).

Batch 8 (`kiln sample --num-samples 8`: temperature 0.8, top-k 200, seeds S..S+7, the precision
`auto` picks for 8 rows (bf16 on CPUs with bf16 arithmetic, else fp16), the weights laid out for 8 rows
as that command lays them out): the eight continuations decoded as one batch (`generate_rows`) against
eight runs of `generate` with the default model one after another (eight `kiln sample` runs); each
row's text is compared with its own run's (equal when both are fp16; bf16 rows part from them).

Bars (issue 18): Kiln >= 2x transformers' tokens/s; the batch >= 3x the runs one after another. Goal:
>= 70% of the bandwidth bound. Exits 1 if a bar fails. A round that would end past --budget minutes
is not started. Run from the repository root:

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/decode.py [--rounds 3] [--tokens 200] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.data.tokenizers import tokenizer_from_spec
from kiln.device import set_threads
from kiln.generate.sampling import SamplingConfig, generate, generate_rows
from kiln.interop.hf import export_hf
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.packed import Fp16Linear, PackedLinear, TransposedLinear, decoding_precision, pack_for_decoding

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,"
SPEED_BAR, BATCH_BAR, BOUND_GOAL = 2.0, 3.0, 0.70
BEFORE = "Kiln before: fp32, plain nn.Linear"
DEFAULT = "Kiln default (kiln sample, --precision auto)"
TRANSFORMERS = "transformers generate, fp32"
BATCH, SEED = 8, 1234


def read_bandwidth() -> float:
    """Bytes/s at which this process sums a 512 MiB fp32 tensor: far past any cache, read once per pass."""
    data = torch.ones(128 * 2**20)
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * data.element_size() / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every linear (or GPT-2 Conv1D) and norm layer's
    weights and biases, once each; embedding tables are left out (a step reads one row of each)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, Fp16Linear):
            weight, bias = torch.ops.quantized.linear_unpack_fp16(module.packed)
            total += weight.numel() * 2 + (0 if bias is None else bias.numel() * bias.element_size())
            continue
        if isinstance(module, TransposedLinear):
            total += sum(t.numel() * t.element_size() for t in (module.weight_t, module.bias) if t is not None)
            continue
        if not isinstance(module, nn.Linear | PackedLinear | nn.LayerNorm | nn.RMSNorm) and (
            type(module).__name__ != "Conv1D"
        ):
            continue
        for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:  # a tied head is wte's own tensor
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def build_model(folder: Path, data_dir: str | None) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    save_checkpoint(folder, model, tokenizer_from_spec("gpt2", data_dir))
    return folder


def first_difference(tokens: list[int], reference: list[int]) -> str:
    for index, (ours, theirs) in enumerate(zip(tokens, reference, strict=False)):
        if ours != theirs:
            return f"differs from token {index + 1}"
    return "same" if len(tokens) == len(reference) else f"same, {len(tokens)} of {len(reference)} tokens"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a Kiln checkpoint to use instead of a random 124M-shape model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core, as kiln sample)")
    parser.add_argument("--budget", type=float, default=13.0, help="minutes: no round starts that would end past it")
    args = parser.parse_args()
    began, threads, load_before = time.perf_counter(), set_threads(args.threads), os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.environ.get("KILN_DATA_DIR")
        folder = Path(args.checkpoint) if args.checkpoint else build_model(Path(tmp) / "kiln", data_dir)
        hf_dir = export_hf(folder, Path(tmp) / "hf")
        sides, (batch_model, batch_precision), hf_model, hf_inputs, tokenizer = load_sides(folder, hf_dir)

    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    assert prompt.tolist() == hf_inputs["input_ids"].tolist(), "the two tokenizers disagree on the prompt"
    greedy = SamplingConfig(max_new_tokens=args.tokens, temperature=0)
    sampled = SamplingConfig(max_new_tokens=args.tokens, temperature=0.8, top_k=200)
    seeds = [SEED + row for row in range(BATCH)]

    def transformers_generate() -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(**hf_inputs, max_new_tokens=args.tokens, do_sample=False)
        return out[0, prompt.shape[1] :].tolist()

    runs = {name: (lambda model=model: list(generate(model, prompt, greedy))) for name, model in sides.items()}
    runs[TRANSFORMERS] = transformers_generate
    default_name = next(name for name in sides if name.startswith(DEFAULT))
    default = sides[default_name]
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    texts: dict[str, list[int]] = {}
    bandwidths, one_by_one, batched, batch_texts = [], [], [], {}
    print(f"{threads} threads; load average {load_before:.1f}; up to {args.rounds} rounds", flush=True)
    for round_number in range(args.rounds):
        round_began = time.perf_counter()
        bandwidths.append(read_bandwidth())
        for name, run in runs.items():
            start = time.perf_counter()
            texts[name] = run()
            speeds[name].append(len(texts[name]) / (time.perf_counter() - start))
        start = time.perf_counter()
        batch_texts["runs"] = [list(generate(default, prompt, sampled_with(sampled, seed))) for seed in seeds]
        one_by_one.append(BATCH * args.tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        rows = list(generate_rows(batch_model, prompt, sampled, seeds))
        batched.append(BATCH * args.tokens / (time.perf_counter() - start))
        batch_texts["batch"] = [list(row) for row in zip(*rows, strict=True)]
        summary = ", ".join(f"{short(name)} {speeds[name][-1]:.1f}" for name in runs)
        print(
            f"round {round_number + 1}: read {bandwidths[-1] / 1e9:.1f} GB/s; tok/s {summary}; "
            f"batch of {BATCH} {batched[-1]:.1f} vs {BATCH} runs {one_by_one[-1]:.1f}",
            flush=True,
        )
        now = time.perf_counter()
        if now + (now - round_began) - began > args.budget * 60:
            break

    rounds = len(bandwidths)
    bandwidth = statistics.median(bandwidths)
    reference = texts[BEFORE]
    ratios = {
        name: statistics.median(s / h for s, h in zip(speeds[name], speeds[TRANSFORMERS], strict=True)) for name in runs
    }
    best = max((name for name in sides if name != BEFORE), key=ratios.get)
    table = Table(
        title=f"Decoding a 124M-shape GPT-2 on CPU, batch 1, greedy, {args.tokens} new tokens, {threads} threads, "
        f"torch {torch.__version__}, {rounds} rounds; read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    for column in ("side", "tok/s", "vs transformers", "weights MB/token", "share of bound", "greedy text", "bar"):
        table.add_column(column, justify="left" if column in ("side", "greedy text", "bar") else "right")
    models = {**sides, TRANSFORMERS: hf_model}
    for name in runs:
        weights = weight_bytes_per_token(models[name])
        share = statistics.median(s * weights / b for s, b in zip(speeds[name], bandwidths, strict=True))
        bar = ""
        if name in (default_name, best):
            bar = f"{'PASS' if ratios[name] >= SPEED_BAR else 'FAIL'} (>= {SPEED_BAR}x)"
            bar += f"; {BOUND_GOAL:.0%} of bound {'met' if share >= BOUND_GOAL else 'not met'}"
        table.add_row(
            name + (" (best)" if name == best else ""),
            f"{statistics.median(speeds[name]):.1f}",
            f"{ratios[name]:.2f}x",
            f"{weights / 2**20:.0f}",
            f"{share:.0%}",
            first_difference(texts[name], reference),
            bar,
        )
    batch_ratio = statistics.median(b / r for b, r in zip(batched, one_by_one, strict=True))
    pairs = list(zip(batch_texts["batch"], batch_texts["runs"], strict=True))
    same_rows = sum(a == b for a, b in pairs)
    parted = [next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y) + 1 for a, b in pairs if a != b]
    rows_note = f"{same_rows} of {BATCH} rows same as their runs"
    if parted:
        rows_note += f" (the others part at token {statistics.median(parted):.0f}, median)"
    table.add_row(
        f"kiln sample --num-samples {BATCH} ({batch_precision} here, temperature 0.8, seeded): one batch vs "
        f"{BATCH} runs",
        f"{statistics.median(batched):.1f} vs {statistics.median(one_by_one):.1f}",
        f"{batch_ratio:.2f}x batch/runs",
        "",
        "",
        rows_note,
        f"{'PASS' if batch_ratio >= BATCH_BAR else 'FAIL'} (>= {BATCH_BAR}x)",
    )
    Console(width=220).print(table)
    print(
        "greedy text: compared with Kiln's plain fp32 decoding, token by token; share of bound: tok/s x weight "
        f"bytes per token / read bandwidth. Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{(time.perf_counter() - began) / 60:.1f} minutes in all"
    )
    return 0 if ratios[default_name] >= SPEED_BAR and batch_ratio >= BATCH_BAR else 1


def short(name: str) -> str:
    return name.split(":")[0].split(",")[0]


def sampled_with(config: SamplingConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(**{**config.__dict__, "seed": seed})


def load_sides(folder: Path, hf_dir: Path):
    """Kiln's ways to decode one sequence, its default model laid out for a batch of BATCH (and that
    model's precision), transformers' model and inputs (loaded as a user would), and Kiln's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = load_checkpoint(folder)
    plain = checkpoint.model.eval()
    chosen, why = decoding_precision(plain)
    sides = {
        BEFORE: plain,
        f"{DEFAULT}: {chosen} here ({why.split(';')[0]})": pack_for_decoding(copy.deepcopy(plain), "auto"),
        "Kiln --precision fp32: transposed weights": pack_for_decoding(copy.deepcopy(plain), "fp32"),
        "Kiln --precision bf16: bf16 weights, packed": pack_for_decoding(copy.deepcopy(plain), "bf16"),
    }
    batch_precision = decoding_precision(plain, BATCH)[0]  # what `auto` picks for kiln sample --num-samples 8
    batch_model = pack_for_decoding(copy.deepcopy(plain), batch_precision, rows=BATCH)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_inputs = AutoTokenizer.from_pretrained(hf_dir)(PROMPT, return_tensors="pt")
    return sides, (batch_model, batch_precision), hf_model, hf_inputs, checkpoint.tokenizer


if __name__ == "__main__":
    sys.exit(main())
