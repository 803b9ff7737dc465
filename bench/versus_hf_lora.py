"""LoRA fine-tuning: Kiln against transformers' Trainer with peft, the same weights, data and recipe.

The workload (issue 18, part 4): a DistilGPT-2-shaped model (6 layers, 12 heads, 768 wide, the GPT-2
vocabulary of 50,257; random weights from a fixed seed, as no trained DistilGPT-2 is at hand offline),
LoRA r 8, alpha 16, dropout 0.05 on the fused q/k/v projection (GPT-2's `c_attn`), batch 4, the Alpaca
template, sequences of at most 256 tokens, 50 steps of AdamW (beta2 0.99, no weight decay, clip 1) at
lr 5e-4 with 10 warmup steps and cosine decay to 5e-5.

- **Trainer**: a user's ordinary script: GPT2LMHeadModel.from_pretrained on the folder, get_peft_model
  with LoraConfig(target_modules=["c_attn"]), prompts tokenized apart from answers so a collator can
  pad and mask the prompt with -100, TrainingArguments with the recipe above, no evaluation, fp32 (the
  defaults). It reads the training examples in Kiln's order (train_sampling_strategy="sequential"), so
  step s of both sides sees the same four examples.
- **Kiln**: what `kiln finetune --init-from FOLDER --lora-r 8 --set block_size=256 ...` runs: import the
  folder, the alpaca template, the 85/10/5 split, `add_lora`, `run_sft` (a val pass over the 110 val
  examples before the first step and after the last, outside the timed steps). Precision is the
  engine's `auto` (bf16 autocast on a CPU with AVX-512 BF16 or AMX, fp32 elsewhere).

Each side runs in its own process, so each peak RSS (VmHWM) is its own: the whole process's (imports,
model load and, for Kiln, the import of the folder), and the training's alone. The two sides take
turns of `--turn` steps, each clock running only on its own turns: this 2-core machine is shared and
its speed drifts by 20-40% from minute to minute. Speed is steps/s over steps 2..50 (step 1 carries
each side's warm-up, and Kiln's first val pass). Bars: Kiln >= 1.5x the Trainer's steps/s (goal 2x),
and the per-step loss curves agree: the mean |Kiln - Trainer| per step is at most 0.5% of the loss.
For scale, the table also gives the same measure between two Kiln runs whose LoRA weights start from
different seeds (run untimed after the race). The Trainer's warmup starts from lr 0 (step s of 10 at
lr * s/10) where Kiln's starts at lr/11 ((s+1)/11), so Kiln runs one warmup step ahead: that, more than
seeds or bf16, is what separates the two curves early on. `--trainer-bf16` races a third side, the
Trainer with bf16=True (for reference; the bar is against the defaults). Prints a table; exits 1 if a
bar fails. About 3 minutes on a quiet machine; from the repository root:

    KILN_DATA_DIR=../shared/data .venv/bin/python bench/versus_hf_lora.py [--steps 50] [--turn 5] [--trainer-bf16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SHAPE = dict(n_layer=6, n_head=12, n_embd=768, vocab_size=50257)  # DistilGPT-2
LORA = dict(r=8, alpha=16.0, dropout=0.05)
BATCH, MAX_TOKENS, LR, MIN_LR_RATIO, WARMUP, BETA2, CLIP, SEED = 4, 256, 5e-4, 0.1, 10, 0.99, 1.0, 1337
SPEED_BAR, SPEED_GOAL, CURVE_BAR = 1.5, 2.0, 0.005
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def restart_peak_rss() -> float:
    """The peak so far (setup: imports, model load), then start counting afresh (Linux's clear_refs 5)."""
    setup = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    return setup


class Turns:
    """A worker's side of the race: it runs `left` steps when the parent says go, times each step from
    the end of the previous one (or from the go, after a pause), and pauses when its turn is done."""

    def __init__(self, conn):
        self.conn, self.records, self.left, self.last_end = conn, [], 0, None

    def wait(self) -> None:
        message = self.conn.recv()
        self.left = message[1] if message[0] == "go" else 0
        self.last_end = time.perf_counter()

    def step_done(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        self.records.append((step, now - self.last_end, loss))
        self.last_end = now
        self.left -= 1
        if self.left <= 0:
            self.conn.send(("paused", self.records))
            self.records = []
            self.wait()


def make_model_folder(folder: Path, data_dir: Path) -> None:
    """A DistilGPT-2-shaped GPT2LMHeadModel with random weights (seed 0) and the GPT-2 tokenizer files.
    Dropout is 0, as Kiln imports GPT-2 for fine-tuning (the Trainer then does no less work than it would)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    config = GPT2Config(
        **SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256
    )
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    bpe = data_dir / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(
        vocab_file=str(bpe / "vocab.json"),
        merges_file=str(bpe / "merges.txt"),
        tokenizer_file=str(bpe / "tokenizer.json"),
    )
    tokenizer.save_pretrained(str(folder))


def kiln_training_order(data_file: Path, folder: Path, steps: int) -> list[dict]:
    """The Alpaca records Kiln's first `steps` steps read, in order (its split, then its epoch-0 shuffle)."""
    from kiln.data.instructions import load_instructions
    from kiln.data.templates import get_template
    from kiln.finetune.examples import ExampleSteps, encode_conversations
    from kiln.interop.tokenizer_files import load_hf_tokenizer

    train = load_instructions(data_file).split(seed=123)["train"]
    examples, _ = encode_conversations(train, get_template("alpaca"), load_hf_tokenizer(folder), MAX_TOKENS)
    if len(examples) != len(train):
        raise RuntimeError("an example lost its whole answer to truncation: the two sides' rows would differ")
    order = ExampleSteps(examples, BATCH, pad_id=0, seed=SEED)
    rows = [int(i) for step in range(steps) for i in order.rows(step)]
    records = [
        {
            "instruction": train[i].messages[0].content,
            "input": train[i].messages[0].context or "",
            "output": train[i].response,
        }
        for i in rows
    ]
    return records, [examples[i] for i in rows]


def same_tokens(records: list[dict], examples: list, folder: Path) -> int:
    """How many records the Trainer's tokenization turns into exactly Kiln's example (inputs and masked
    labels; Kiln's inputs stop one token short, as the Trainer's model shifts its labels itself)."""
    from transformers import AutoTokenizer

    encode = trainer_encoder(AutoTokenizer.from_pretrained(str(folder)))
    same = 0
    for record, example in zip(records, examples, strict=True):
        hf = encode(record)
        same += hf["input_ids"][:-1] == example.inputs and hf["labels"][1:] == example.labels
    return same


# --- the Trainer side: a user's script -------------------------------------------------------------------


def trainer_encoder(tokenizer):
    """The script's encoding: the Alpaca prompt and the answer tokenized apart, so the prompt's labels
    can be -100; the answer ends with EOS; at most 256 tokens."""

    def encode(record: dict) -> dict:
        prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
        if record["input"]:
            prompt += f"\n\n### Input:\n{record['input']}"
        prompt += "\n\n### Response:\n"
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(record["output"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + answer_ids)[:MAX_TOKENS]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:MAX_TOKENS]
        return {"input_ids": ids, "labels": labels}

    return encode


def trainer_worker(conn, folder: str, records: list[dict], steps: int, bf16: bool, out: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoTokenizer,
        GPT2LMHeadModel,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=["c_attn"],
            task_type="CAUSAL_LM",
        ),
    )

    encode = trainer_encoder(tokenizer)

    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [tokenizer.eos_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(f["labels"] + [-100] * pad)
        return {key: torch.tensor(rows) for key, rows in batch.items()}

    dataset = Dataset.from_list([encode(r) for r in records])
    turns = Turns(conn)

    class RaceTurns(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                turns.step_done(state.global_step, logs["loss"])

    arguments = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO},
        warmup_steps=WARMUP,
        weight_decay=0.0,
        adam_beta2=BETA2,
        max_grad_norm=CLIP,
        train_sampling_strategy="sequential",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        seed=SEED,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collate, callbacks=[RaceTurns()]
    )
    trainer.remove_callback(PrinterCallback)  # a dict printed at every step would bury the table
    conn.send(("ready", time.perf_counter() - began, torch.get_num_threads()))
    setup_rss = restart_peak_rss()
    turns.wait()
    trainer.train()
    conn.send(("done", (setup_rss, peak_rss_mb()), {"precision": "bf16 autocast" if bf16 else "fp32"}))


# --- the Kiln side -----------------------------------------------------------------------------------------


def kiln_worker(conn, folder: str, data_file: str, steps: int, init_seed: int, out: str) -> None:
    import torch

    from kiln.checkpoint import load_checkpoint, save_adapter
    from kiln.data.instructions import load_instructions
    from kiln.data.templates import get_template
    from kiln.device import precision_reason
    from kiln.finetune.examples import encode_conversations
    from kiln.finetune.run import prepare_vocabulary
    from kiln.finetune.sft import finetune_settings, run_sft
    from kiln.interop.hf import import_hf
    from kiln.model.lora import LoraSettings, add_lora

    warnings.simplefilter("ignore")
    began = time.perf_counter()
    settings = {"lr": LR, "min_lr_ratio": MIN_LR_RATIO, "warmup_iters": WARMUP, "grad_clip": CLIP}
    settings |= {"batch_size": BATCH, "max_iters": steps, "eval_interval": steps, "block_size": MAX_TOKENS}
    settings |= {"seed": SEED, "template": "alpaca"}
    config, train_config = finetune_settings(settings)
    base = import_hf(folder, Path(out) / "base", force=True)  # what --init-from does with a Hugging Face folder
    checkpoint = load_checkpoint(base)
    torch.manual_seed(init_seed)  # the LoRA weights' start (kiln finetune seeds it with the run's seed)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    data = load_instructions(data_file)
    template = get_template(config.template)
    tokenizer, new_ids = prepare_vocabulary(model, tokenizer, template, data)
    model.resize_context(config.block_size)
    splits = data.split(seed=config.split_seed)
    train, _ = encode_conversations(splits["train"], template, tokenizer, model.config.block_size)
    val, _ = encode_conversations(splits["val"], template, tokenizer, model.config.block_size)
    lora = LoraSettings(LORA["r"], LORA["alpha"], LORA["dropout"], "attn")
    trained = add_lora(model, lora, new_ids)

    def save(target, module, state):
        save_adapter(target, module, base, tokenizer, {"template": template.name}, state)

    def restore(target, module):
        raise AssertionError("the race never resumes")

    turns = Turns(conn)
    precision = precision_reason(train_config.precision, torch.device("cpu"), model.config.n_embd).split(" (")[0]
    conn.send(("ready", time.perf_counter() - began, torch.get_num_threads()))
    setup_rss = restart_peak_rss()
    turns.wait()
    result = run_sft(
        trained,
        train,
        val,
        config,
        train_config,
        tokenizer.eos_id,
        Path(out) / "run",
        save,
        restore,
        on_step=turns.step_done,
        lora=True,
    )
    extra = {
        "precision": precision,
        "val": len(val),
        "first_val": result.first_val_loss,
        "last_val": result.last_val_loss,
    }
    conn.send(("done", (setup_rss, peak_rss_mb()), extra))


# --- the race ----------------------------------------------------------------------------------------------


class Side:
    def __init__(self, name: str, target, args: tuple):
        context = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        self.records: list[tuple[int, float, float]] = []
        message = self.receive()
        self.setup_s, self.threads = message[1], message[2]

    def receive(self):
        message = self.conn.recv()
        if message[0] not in ("ready", "paused", "done"):
            raise RuntimeError(f"{self.name}: {message}")
        return message

    def turn(self, steps: int) -> None:
        self.conn.send(("go", steps))
        self.records += self.receive()[1]

    def finish(self) -> None:
        self.conn.send(("finish",))
        _, (self.setup_rss, self.train_rss), self.extra = self.receive()
        self.process.join()

    @property
    def losses(self) -> np.ndarray:
        return np.array([loss for _, _, loss in self.records])

    @property
    def timed_seconds(self) -> float:
        return sum(seconds for step, seconds, _ in self.records if step > 1)

    @property
    def steps_per_s(self) -> float:
        return (len(self.records) - 1) / self.timed_seconds


def race(sides: list[Side], steps: int, turn: int) -> list[float]:
    """Alternate turns of `turn` steps (who goes first alternates too); returns each round's ratio of
    Kiln's steps/s to the Trainer's (sides[0] is the Trainer, sides[1] Kiln)."""
    done, ratios, rounds = 0, [], 0
    while done < steps:
        n = min(turn, steps - done)
        pace = {}
        for side in sides if rounds % 2 == 0 else sides[::-1]:
            before = len(side.records)
            side.turn(n)
            timed = [seconds for step, seconds, _ in side.records[before:] if step > 1]
            pace[side.name] = len(timed) / sum(timed) if timed else None
        if pace[sides[0].name] and pace[sides[1].name]:
            ratios.append(pace[sides[1].name] / pace[sides[0].name])
        done, rounds = done + n, rounds + 1
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--turn", type=int, default=5, help="steps per turn")
    parser.add_argument("--trainer-bf16", action="store_true", help="also race the Trainer with bf16=True")
    parser.add_argument("--no-seed-run", action="store_true", help="skip the second Kiln run (the seeds' spread)")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("KILN_DATA_DIR", "../shared/data"))
    data_file = data_dir / "instruction-data.json"
    if not data_file.is_file():
        print(f"{data_file}: not found; set KILN_DATA_DIR to the shared data folder", file=sys.stderr)
        return 2

    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-lora-bench-") as tmp:
        folder = Path(tmp) / "distilgpt2-random"
        make_model_folder(folder, data_dir)
        records, examples = kiln_training_order(data_file, folder, args.steps)
        identical = same_tokens(records, examples, folder)
        sides = [
            Side("Trainer + peft", trainer_worker, (str(folder), records, args.steps, False, f"{tmp}/hf")),
            Side("kiln finetune", kiln_worker, (str(folder), str(data_file), args.steps, SEED, f"{tmp}/kiln")),
        ]
        if args.trainer_bf16:
            sides.append(
                Side(
                    "Trainer + peft, bf16=True", trainer_worker, (str(folder), records, args.steps, True, f"{tmp}/hf16")
                )
            )
        ratios = race(sides, args.steps, args.turn)
        for side in sides:
            side.finish()
        other = None
        if not args.no_seed_run:  # for scale: Kiln again, its LoRA weights from another seed, alone and untimed
            other = Side(
                "kiln, other seed", kiln_worker, (str(folder), str(data_file), args.steps, SEED + 1, f"{tmp}/k2")
            )
            other.turn(args.steps)
            other.finish()

    trainer, kiln = sides[0], sides[1]
    ratio = kiln.steps_per_s / trainer.steps_per_s
    gap = np.abs(kiln.losses - trainer.losses).mean() / trainer.losses.mean()
    speed_ok, curve_ok = ratio >= SPEED_BAR, gap <= CURVE_BAR

    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"LoRA r{LORA['r']} on c_attn, DistilGPT-2 shape, batch {BATCH}, {args.steps} steps, "
        f"torch {torch.__version__}, {kiln.threads} threads",
        box=box.MARKDOWN,
    )
    columns = ("side", "precision", "steps/s (2..N)", "vs Trainer", "peak RSS MB", "setup / training peaks")
    for column in (*columns, "loss step 1", "loss, last 10"):
        table.add_column(column)
    for side in sides:
        table.add_row(
            side.name,
            side.extra["precision"],
            f"{side.steps_per_s:.2f}",
            f"{side.steps_per_s / trainer.steps_per_s:.2f}x",
            f"{max(side.setup_rss, side.train_rss):,.0f}",
            f"{side.setup_rss:,.0f} / {side.train_rss:,.0f}",
            f"{side.losses[0]:.4f}",
            f"{side.losses[-10:].mean():.4f}",
        )
    Console(width=200).print(table)
    print(
        f"\nspeed: kiln {ratio:.2f}x the Trainer's steps/s (per-round ratios {min(ratios):.2f}-{max(ratios):.2f}, "
        f"median {np.median(ratios):.2f}); bar {SPEED_BAR}x {'holds' if speed_ok else 'FAILS'}, "
        f"goal {SPEED_GOAL}x {'met' if ratio >= SPEED_GOAL else 'not met'}"
    )
    seeds = ""
    if other is not None:
        half = len(kiln.losses) // 2
        late = np.abs(kiln.losses - trainer.losses)[half:].mean() / trainer.losses.mean()
        noise = [
            np.abs(kiln.losses - other.losses)[part].mean() / kiln.losses.mean()
            for part in (slice(None), slice(half, None))
        ]
        seeds = (
            f" (kiln against kiln from another LoRA seed: {100 * noise[0]:.2f}%); over the second half "
            f"{100 * late:.2f}% (seeds: {100 * noise[1]:.2f}%)"
        )
    print(
        f"loss curves: mean |kiln - Trainer| per step {100 * gap:.2f}% of the loss{seeds}; "
        f"bar <= {100 * CURVE_BAR:g}% {'holds' if curve_ok else 'FAILS'}"
    )
    print(
        f"kiln val loss over {kiln.extra['val']} examples: {kiln.extra['first_val']:.4f} before, "
        f"{kiln.extra['last_val']:.4f} after; setup s: "
        + ", ".join(f"{side.name} {side.setup_s:.1f}" for side in sides)
        + f"; bench wall {time.perf_counter() - started:.0f} s"
    )
    print(
        f"data: the same {len(records)} examples in the same order on both sides; {identical} of them "
        "tokenized to identical ids and prompt masks"
    )
    print(
        "per-step losses: "
        + json.dumps({side.name: [round(x, 4) for x in side.losses] for side in (*sides, other) if side})
    )
    return 0 if speed_ok and curve_ok else 1


if __name__ == "__main__":
    sys.exit(main())
