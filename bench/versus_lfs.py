"""Kiln against LLMs-from-scratch's chapter 5 pretraining workload, each side in its own process.

The workload: a GPT-124M shape (12 layers, 12 heads, 768 wide) with context 256, dropout 0.1 and no
bias on the query/key/value projections, on The Verdict (GPT-2 tokens) split 90/10 by characters,
batches of 2 windows cut at stride 256, AdamW (lr 5e-4, weight decay 0.1), 10 epochs.

- **baseline**: an eager fp32 GPT and training loop written here in the book's chapter 4-5 style: a
  GPTModel of its own MultiHeadAttention (a causal mask buffer, softmax written out), LayerNorm, GELU
  and FeedForward modules, token + position embeddings, an untied output head, PyTorch's default
  initialisation; a torch Dataset of stride-256 windows of tiktoken GPT-2 ids; DataLoader(shuffle=True,
  drop_last=True); AdamW at a constant rate, no clipping; an evaluation every 5 steps of 5 train batches
  and all val windows (the book's eval_freq=5, eval_iter=5). The book's per-epoch text sample is left
  out, so the baseline's time is a little less than the book's script's.
- **kiln**: the command a user runs for this workload, `kiln train ... --preset lfs-124m --epochs 10`.

Each side runs in a fresh process, one after the other, so wall time (process start to exit), CPU time
and peak RSS (the child's ru_maxrss) are its own; on a machine shared with other work, CPU time is the
figure that holds (run it with OMP_WAIT_POLICY=PASSIVE then, so threads waiting for a core do not spin).
Both report val loss as the mean over the same val windows (the
split's stride-256 windows: 2 of 256 tokens); a third process reloads Kiln's best and last checkpoints
and scores them on the baseline's own val windows, so the two sides' numbers are the same measurement.
Bars: Kiln's wall time <= 1/2 of the baseline's (goal 1/3), best val <= the baseline's, peak RSS <=
70% of the baseline's. Prints a table; exits 1 if a bar fails. From the repository root:

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/versus_lfs.py   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}
TRAIN_RATIO, BATCH, EPOCHS, LR, WEIGHT_DECAY, SEED = 0.9, 2, 10, 5e-4, 0.1, 123
EVAL_FREQ, EVAL_ITER = 5, 5
TIME_BAR, TIME_GOAL, RSS_BAR = 1 / 2, 1 / 3, 0.70
KILN_COMMAND = ["train", "--data", "the-verdict", "--tokenizer", "gpt2", "--preset", "lfs-124m", "--epochs", "10"]


# ---------------------------------------------------------------- the baseline, in the book's style


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        split = (b, num_tokens, self.num_heads, self.head_dim)
        queries = self.W_query(x).view(split).transpose(1, 2)
        keys = self.W_key(x).view(split).transpose(1, 2)
        values = self.W_value(x).view(split).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(), nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"]
        )
        self.ff = FeedForward(cfg)
        self.norm1, self.norm2 = LayerNorm(cfg["emb_dim"]), LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        _, seq_len = in_idx.shape
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


class GPTDataset(Dataset):
    """Windows of `max_length` token ids and their next-token targets, one every `stride` tokens."""

    def __init__(self, txt, tokenizer, max_length, stride):
        self.input_ids, self.target_ids = [], []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i : i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1 : i + max_length + 1]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader(txt, tokenizer, batch_size, max_length, stride, shuffle, drop_last):
    dataset = GPTDataset(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=0)


def calc_loss_batch(input_batch, target_batch, model):
    logits = model(input_batch)
    return nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, num_batches=None):
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model).item()
    return total / num_batches


def evaluate_model(model, train_loader, val_loader, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model)  # every val window
    model.train()
    return train_loss, val_loss


def gpt2_tokenizer(data_dir: Path):
    """tiktoken's gpt2 encoding, built offline from OpenAI's encoder.json and vocab.bpe."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    folder = data_dir / "gpt2-tokenizer"
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def book_loaders(data_dir: Path):
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")
    split_idx = int(TRAIN_RATIO * len(text))
    tokenizer = gpt2_tokenizer(data_dir)
    context = CONFIG_124M["context_length"]
    train_loader = create_dataloader(text[:split_idx], tokenizer, BATCH, context, context, True, True)
    val_loader = create_dataloader(text[split_idx:], tokenizer, BATCH, context, context, False, False)
    return train_loader, val_loader


def run_baseline(data_dir: Path, epochs: int) -> dict:
    torch.manual_seed(SEED)
    train_loader, val_loader = book_loaders(data_dir)
    model = GPTModel(CONFIG_124M)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train_losses, val_losses, global_step = [], [], -1
    for _ in range(epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model)
            loss.backward()
            optimizer.step()
            global_step += 1
            if global_step % EVAL_FREQ == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, EVAL_ITER)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"step {global_step:3d}: train {train_loss:.3f}, val {val_loss:.3f}", flush=True)
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, len(train_loader))
    return {
        "steps": global_step + 1,
        "best_val": min([*val_losses, val_loss]),
        "final_val": val_loss,
        "final_train": train_loss,
        "val_windows": len(val_loader.dataset),
    }


# ---------------------------------------------------------------- scoring Kiln's checkpoints on the book's windows


def score_kiln(run_dir: Path, data_dir: Path) -> dict:
    """Kiln's best and last checkpoints scored on the baseline's own windows: val loss over every val
    window, train loss over every train window; and whether Kiln's prepared val split cut the same windows."""
    from kiln.checkpoint import load_checkpoint
    from kiln.data.loaders import stride_starts, windows_at
    from kiln.data.prepared import PreparedCorpus

    torch.manual_seed(SEED)
    train_loader, val_loader = book_loaders(data_dir)
    every_train = DataLoader(train_loader.dataset, batch_size=BATCH)
    scores = {}
    for name in ("best", "last"):
        model = load_checkpoint(run_dir / name).model.eval()
        with torch.no_grad():
            scores[f"{name}_val"] = calc_loss_loader(val_loader, lambda x, m=model: m(x)[0])
            if name == "last":
                scores["last_train"] = calc_loss_loader(every_train, lambda x, m=model: m(x)[0])
    config = json.loads((run_dir / "last" / "config.json").read_text())
    prepared = PreparedCorpus.open(config["data"])
    val = prepared.tokens("val")
    kiln_windows = windows_at(
        val, stride_starts(len(val), CONFIG_124M["context_length"]), CONFIG_124M["context_length"]
    )
    book_windows = (torch.stack(val_loader.dataset.input_ids), torch.stack(val_loader.dataset.target_ids))
    scores["same_val_windows"] = all(torch.equal(a, b) for a, b in zip(kiln_windows, book_windows, strict=True))
    scores["val_windows"] = len(val_loader.dataset)
    return scores


# ---------------------------------------------------------------- the comparison


def run_child(command: list[str], env: dict, log: Path) -> tuple[float, float, int, float, float]:
    """Run `command` to its end; (wall seconds, the child's peak RSS in GB, exit status, its CPU seconds,
    the machine's mean load while it ran). Its output goes to `log` and, line by line, to ours. CPU
    seconds are the contention-proof measure: when other work shares the cores, wall time grows with it
    and CPU time hardly does."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(log, "w") as out:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in child.stdout:
            out.write(line)
            if "\r" not in line:
                print("   ", line.rstrip(), flush=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    load = (load + os.getloadavg()[0]) / 2
    return wall, usage.ru_maxrss * 1024 / 1e9, child.returncode, usage.ru_utime + usage.ru_stime, load


def kiln_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "steps": rows[-1]["step"],
        "best_val": min(r["val_loss"] for r in rows),
        "final_val": rows[-1]["val_loss"],
        "evaluations": len(rows),
    }


def compare(args: argparse.Namespace, data_dir: Path, work: Path) -> int:
    python, env = sys.executable, {**os.environ, "KILN_DATA_DIR": str(data_dir)}
    here = str(Path(__file__).resolve())
    kiln_command = [
        python,
        "-m",
        "kiln",
        *KILN_COMMAND[:-1],
        str(args.epochs),
        *args.kiln_extra,
        "--out",
        str(work / "run"),
    ]
    print("kiln:", " ".join(["kiln", *kiln_command[3:]]), flush=True)
    kiln_wall, kiln_rss, status, kiln_cpu, kiln_load = run_child(kiln_command, env, work / "kiln.log")
    if status:
        raise SystemExit(f"kiln train failed (exit {status}); see {work / 'kiln.log'}")
    kiln = kiln_metrics(work / "run")
    print("baseline: the book-style GPT and loop", flush=True)
    base_json = work / "baseline.json"
    command = [python, here, "--side", "baseline", "--epochs", str(args.epochs), "--json", str(base_json)]
    base_wall, base_rss, status, base_cpu, base_load = run_child(command, env, work / "baseline.log")
    if status:
        raise SystemExit(f"the baseline failed (exit {status}); see {work / 'baseline.log'}")
    base = json.loads(base_json.read_text())
    score_json = work / "score.json"
    command = [python, here, "--side", "score", "--run", str(work / "run"), "--json", str(score_json)]
    if run_child(command, env, work / "score.log")[2]:
        raise SystemExit(f"scoring Kiln's checkpoints failed; see {work / 'score.log'}")
    score = json.loads(score_json.read_text())

    rows = [
        (
            "baseline (book-style eager fp32, untied, default init)",
            base_wall,
            base_cpu,
            base_load,
            base_rss,
            base["steps"],
            base["best_val"],
            base["final_val"],
            base["final_train"],
        ),
        (
            "kiln lfs-124m",
            kiln_wall,
            kiln_cpu,
            kiln_load,
            kiln_rss,
            kiln["steps"],
            kiln["best_val"],
            kiln["final_val"],
            score["last_train"],
        ),
    ]
    print(
        f"\nThe Verdict, GPT-2 tokens, {args.epochs} epochs; val loss over the same {score['val_windows']} val windows "
        f"(Kiln's val split cuts the same windows: {score['same_val_windows']}); "
        f"Kiln's checkpoints rescored by the baseline's code: best {score['best_val']:.4f}, "
        f"last {score['last_val']:.4f}\n"
    )
    print("| run | wall s | CPU s | load | peak RSS GB | steps | best val | final val | final train loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, wall, cpu, load, rss, steps, best, final, train in rows:
        print(
            f"| {name} | {wall:.1f} | {cpu:.1f} | {load:.1f} | {rss:.2f} | {steps} | {best:.4f} | {final:.4f} | "
            f"{train:.4f} |"
        )
    time_ratio, rss_ratio, cpu_ratio = kiln_wall / base_wall, kiln_rss / base_rss, kiln_cpu / base_cpu
    print(f"\nCPU time {cpu_ratio:.2f}x the baseline's (what the wall-time ratio is on a machine they have alone)")
    bars = [
        (
            f"wall time {time_ratio:.2f}x the baseline's (bar <= {TIME_BAR:.2f}, goal <= {TIME_GOAL:.2f})",
            time_ratio <= TIME_BAR,
            " (goal met)" if time_ratio <= TIME_GOAL else "",
        ),
        (
            f"best val {kiln['best_val']:.4f} vs {base['best_val']:.4f} (bar: <=)",
            kiln["best_val"] <= base["best_val"],
            "",
        ),
        (f"peak RSS {rss_ratio:.2f}x the baseline's (bar <= {RSS_BAR:.2f})", rss_ratio <= RSS_BAR, ""),
    ]
    print()
    for text, held, extra in bars:
        print(f"- {text}: {'holds' if held else 'MISSED'}{extra}")
    return 0 if all(held for _, held, _ in bars) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--side", choices=("baseline", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="write the runs and logs here instead of a temporary folder")
    args, kiln_extra = parser.parse_known_args()  # the rest goes to kiln train, e.g. --set lr=1e-3
    args.kiln_extra = kiln_extra
    data_dir = Path(os.environ.get("KILN_DATA_DIR", "../shared/data")).resolve()
    if args.side == "baseline":
        args.json.write_text(json.dumps(run_baseline(data_dir, args.epochs)))
        return 0
    if args.side == "score":
        args.json.write_text(json.dumps(score_kiln(args.run, data_dir)))
        return 0
    if args.keep:
        shutil.rmtree(args.keep / "run", ignore_errors=True)
        args.keep.mkdir(parents=True, exist_ok=True)
        return compare(args, data_dir, args.keep)
    with tempfile.TemporaryDirectory(prefix="versus_lfs-") as work:
        return compare(args, data_dir, Path(work))


if __name__ == "__main__":
    sys.exit(main())
