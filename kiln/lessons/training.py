"""Lesson 4: loss and training.

From a model's logits to the cross-entropy loss, by hand and with PyTorch; why an untrained model
scores about ln(vocabulary size); The Verdict cut into windows with a context length and a stride, as
LLMs-from-scratch ch. 5 does; a training loop written out in full; the same job through Kiln's own
trainer (`kiln train`); and what temperature and top-k do to the text a model writes.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape

from kiln.data.corpus import open_corpus
from kiln.data.loaders import SlidingWindows
from kiln.data.prepare import prepare_corpus
from kiln.data.tokenizers import GPT2Tokenizer, Tokenizer
from kiln.generate.sampling import SamplingConfig, process_logits, stream_text
from kiln.lessons.catalog import LessonContext
from kiln.lessons.narrate import Narrator, new_figure
from kiln.lessons.text import lesson_text
from kiln.model.gpt import GPT
from kiln.model.presets import preset_config
from kiln.train.optim import OptimConfig, lr_factor
from kiln.train.run import train_and_report
from kiln.train.trainer import METRICS_FILE

DEFAULT_TEXT = "the-verdict"
# A longer --corpus is cut to about The Verdict's size, so every step still takes seconds, not minutes.
MAX_CHARS = 21_000
MIN_CHARS = 12_000  # its last tenth must still hold one window of context + 1 GPT-2 tokens
PRESET = "tiny"
CONTEXT, STRIDE, BATCH = 256, 256, 2  # LLMs-from-scratch ch. 5's settings
TRAIN_FRACTION = 0.9
SEED = 123
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.1
EPOCHS = {False: 5, True: 1}  # keyed by context.quick
KILN_STEPS = {False: 27, True: 2}
KILN_EVAL_EVERY = {False: 9, True: 2}
KILN_LR = 2e-3  # warmup lets the trainer start gently and so peak higher than the loop's fixed rate
EXAMPLES = ("Every effort moves you", "I really like chocolate")  # the book's two example sequences
PROMPT = "Every effort moves you"
NEW_TOKENS = {False: 20, True: 8}
TEMPERATURES = (0.5, 1.0, 1.5)


# ---------------------------------------------------------------- cross-entropy


def target_probabilities(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary, then the probability each position gave its own target token."""
    probabilities = torch.softmax(logits, dim=-1)
    return probabilities.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean of -log p(target) over every position.

    `logits` is [T, V] for one sequence or [B, T, V] for a batch; a batch is flattened to [B*T, V] rows
    first, so every token of every sequence counts once, exactly as F.cross_entropy wants its input.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    return -target_probabilities(flat_logits, flat_targets).log().mean()


def example_batch(tokenizer: Tokenizer, texts: tuple[str, ...] = EXAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T] from short texts: the targets are the inputs shifted one token left."""
    rows = [tokenizer.encode(text) for text in texts]
    length = min(len(row) for row in rows)  # a batch is a rectangle
    ids = torch.tensor([row[:length] for row in rows])
    return ids[:, :-1], ids[:, 1:]


def random_model(vocab_size: int, seed: int = SEED) -> GPT:
    """A freshly initialised `tiny` GPT: nothing learned yet."""
    torch.manual_seed(seed)
    return GPT(preset_config(PRESET, vocab_size=vocab_size))


# ---------------------------------------------------------------- data


def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """The first 90% of characters to train on, the last 10% held out (each is tokenized on its own)."""
    cut = int(train_fraction * len(text))
    return text[:cut], text[cut:]


def text_loaders(
    text: str,
    tokenizer: Tokenizer,
    context: int = CONTEXT,
    stride: int = STRIDE,
    batch_size: int = BATCH,
    seed: int = SEED,
) -> tuple[SlidingWindows, SlidingWindows]:
    """Train and val loaders of windows `context` tokens long, starting every `stride` tokens.

    As in the book, training shuffles its windows and drops a last, incomplete batch; validation keeps
    every window in order.
    """
    train_text, val_text = split_text(text)
    train_ids = np.array(tokenizer.encode(train_text), dtype=np.int64)
    val_ids = np.array(tokenizer.encode(val_text), dtype=np.int64)
    train = SlidingWindows(train_ids, context, batch_size, stride=stride, shuffle=True, seed=seed, label="train")
    val = SlidingWindows(val_ids, context, batch_size, stride=stride, drop_last=False, label="val")
    return train, val


@torch.no_grad()
def loss_over_loader(model: GPT, loader: SlidingWindows) -> float:
    """The mean loss over one pass of the loader, the model in eval mode (no dropout, no gradients)."""
    model.eval()
    losses = [F.cross_entropy(model(inputs)[0].flatten(0, 1), targets.flatten()).item() for inputs, targets in loader]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- the training loop


def train_one_epoch(
    model: GPT,
    loader: SlidingWindows,
    optimizer: torch.optim.Optimizer,
) -> list[float]:
    """One pass over the training windows; returns each batch's loss."""
    # (The lesson prints this function, so its lines stay within 80 columns.)
    model.train()
    losses = []
    for inputs, targets in loader:
        optimizer.zero_grad()  # .grad adds up: clear the last batch's
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()  # d(loss)/d(weight), for every weight
        # One unlucky batch can throw the weights far off (without this
        # line the val loss here leaps to 14 in epoch 5); capping the
        # gradient's overall length at 1.0 keeps every step a modest one.
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()  # move each weight a little against its gradient
        losses.append(loss.item())
    return losses


@dataclass
class EpochLog:
    epoch: int
    tokens_seen: int
    train_loss: float  # the mean of the epoch's batch losses, measured while it trained
    val_loss: float  # measured after the epoch, on text the model never trains on
    step_losses: list[float]


def train_minimal(
    model: GPT,
    train_loader: SlidingWindows,
    val_loader: SlidingWindows,
    epochs: int,
    lr: float = LEARNING_RATE,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """AdamW at one fixed learning rate, `epochs` passes over the data, the val loss after each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    logs, tokens = [], 0
    for epoch in range(1, epochs + 1):
        losses = train_one_epoch(model, train_loader, optimizer)
        tokens += len(losses) * train_loader.batch_size * train_loader.block_size
        log = EpochLog(epoch, tokens, sum(losses) / len(losses), loss_over_loader(model, val_loader), losses)
        logs.append(log)
        if on_epoch:
            on_epoch(log)
    return logs


# ---------------------------------------------------------------- generation


def sampling_settings(max_new_tokens: int, seed: int = SEED) -> dict[str, SamplingConfig]:
    """The settings the lesson compares, each under one seed so a run can be repeated exactly."""

    def config(temperature: float, top_k: int | None = None) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)

    return {
        "greedy (temperature 0)": config(0.0),
        **{f"temperature {t}": config(t) for t in TEMPERATURES},
        "top-k 5, temperature 1.0": config(1.0, 5),
        "top-k 5, temperature 1.5": config(1.5, 5),
    }


def continuations(model: GPT, tokenizer: Tokenizer, prompt: str, settings: dict[str, SamplingConfig]) -> dict[str, str]:
    """What the model writes after `prompt` under each sampling setting."""
    return {name: "".join(stream_text(model, tokenizer, prompt, config)) for name, config in settings.items()}


@torch.no_grad()
def next_token_table(model: GPT, tokenizer: Tokenizer, prompt: str, top: int = 5) -> list[list[str]]:
    """The most likely next tokens and their probabilities at each temperature, plus all the rest."""
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    logits = model(ids)[0][:, -1]
    columns = [process_logits(logits, ids, SamplingConfig(temperature=t)).softmax(dim=-1)[0] for t in TEMPERATURES]
    order = columns[TEMPERATURES.index(1.0)].argsort(descending=True)[:top]
    rows = [[repr(tokenizer.decode([int(i)]))] + [f"{column[i]:.3f}" for column in columns] for i in order]
    rest = [f"{1 - float(column[order].sum()):.3f}" for column in columns]
    return rows + [[f"the other {len(columns[0]) - top:,} tokens", *rest]]


# ---------------------------------------------------------------- the lesson, step by step


def run(context: LessonContext) -> dict:
    """Run lesson 4; returns the figures it printed."""
    say = context.narrator
    tokenizer = GPT2Tokenizer.resolve(context.data_dir)
    figures: dict = {"vocab_size": tokenizer.vocab_size}
    model = random_model(tokenizer.vocab_size)
    inputs, targets = example_batch(tokenizer)
    figures |= _one_sequence(say, model, tokenizer, inputs[0], targets[0])
    figures |= _batch(say, model, inputs, targets)
    figures |= _random_model_loss(say, model, tokenizer.vocab_size, figures["ce_batch_torch"])

    spec = context.corpus or DEFAULT_TEXT
    text = lesson_text(spec, context.data_dir, MIN_CHARS, MAX_CHARS)
    train_loader, val_loader = text_loaders(text, tokenizer)
    figures |= _windows(say, spec, text, model, train_loader, val_loader)
    figures |= _minimal_loop(say, model, train_loader, val_loader, EPOCHS[context.quick], figures)

    text_file = context.out_dir / f"{Path(spec).stem}.txt"  # the very text the loop used, for the trainer
    text_file.write_text(text, encoding="utf-8")
    figures |= _with_kiln_train(say, text_file, context, KILN_STEPS[context.quick], figures)
    figures |= _generation(say, model, tokenizer, NEW_TOKENS[context.quick])
    return figures


def _one_sequence(say: Narrator, model: GPT, tokenizer: Tokenizer, inputs, targets) -> dict:
    say.step("Cross-entropy for one sequence, by hand")
    say.say(
        f"The text {escape(repr(EXAMPLES[0]))} is {len(inputs) + 1} GPT-2 tokens. At each position the model "
        "reads the tokens so far and scores every one of the vocabulary's tokens as the next one (its logits). "
        "Softmax turns the scores into probabilities; the loss is -log of the probability the model gave the "
        "token that really came next, averaged over the positions."
    )
    model.eval()
    with torch.no_grad():
        logits = model(inputs[None])[0][0]  # [T, V]
    say.show("logits shape (positions, vocabulary)", tuple(logits.shape))
    probabilities = target_probabilities(logits, targets)
    rows = [
        [
            position,
            repr(tokenizer.decode(inputs[: position + 1].tolist())),
            repr(tokenizer.decode([int(target)])),
            f"{float(p):.3e}",
            f"{-math.log(float(p)):.4f}",
        ]
        for position, (target, p) in enumerate(zip(targets, probabilities, strict=True))
    ]
    say.table(
        ["position", "the model has read", "next token", "p(next token)", "-log p"],
        [[escape(str(c)) for c in r] for r in rows],
    )
    by_hand = float(cross_entropy_by_hand(logits, targets))
    with_torch = float(F.cross_entropy(logits, targets))
    say.show("mean of -log p, by hand", f"{by_hand:.6f}")
    say.show("torch.nn.functional.cross_entropy(logits, targets)", f"{with_torch:.6f}")
    return {"ce_one_by_hand": by_hand, "ce_one_torch": with_torch}


def _batch(say: Narrator, model: GPT, inputs, targets) -> dict:
    say.step("Cross-entropy for a batch: flatten, then the same")
    with torch.no_grad():
        logits = model(inputs)[0]
    say.say(
        "A batch stacks sequences: logits become \\[batch, positions, vocabulary]. F.cross_entropy wants one row of "
        "scores per target, so batch and positions are flattened into one axis; every token then counts once."
    )
    say.show("logits", f"{tuple(logits.shape)} -> flattened {tuple(logits.flatten(0, 1).shape)}")
    say.show("targets", f"{tuple(targets.shape)} -> flattened {tuple(targets.flatten().shape)}")
    by_hand = float(cross_entropy_by_hand(logits, targets))
    with_torch = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    say.show("batch loss by hand", f"{by_hand:.6f}")
    say.show("batch loss, F.cross_entropy", f"{with_torch:.6f}")
    return {"ce_batch_by_hand": by_hand, "ce_batch_torch": with_torch}


def _random_model_loss(say: Narrator, model: GPT, vocab_size: int, loss: float) -> dict:
    say.step("An untrained model's loss is about ln(vocabulary size)")
    say.say(
        "A new model's weights are small random numbers, so its logits are all close to 0 and softmax spreads "
        f"the probability almost evenly: about 1/{vocab_size:,} for every token. -log(1/V) = ln(V)."
    )
    ln_vocab = math.log(vocab_size)
    say.show("ln(50,257)" if vocab_size == 50257 else f"ln({vocab_size:,})", f"{ln_vocab:.4f}")
    say.show("the untrained model's batch loss", f"{loss:.4f}")
    say.show(
        "perplexity exp(loss)",
        f"{math.exp(loss):,.0f} (as unsure as a uniform pick among that many tokens)",
    )
    return {"random_loss": loss, "ln_vocab": ln_vocab}


def _windows(say: Narrator, spec: str, text: str, model: GPT, train_loader, val_loader) -> dict:
    say.step(f"{escape(spec)}: windows with a context length and a stride")
    train_tokens, val_tokens = len(train_loader.tokens), len(val_loader.tokens)
    say.say(
        f"{len(text):,} characters; the first {TRAIN_FRACTION:.0%} train, the last {1 - TRAIN_FRACTION:.0%} "
        f"validate. Windows of {CONTEXT} tokens start every {STRIDE} tokens (stride = context: no overlap), and "
        f"each batch holds {BATCH} windows; a window's targets are the same {CONTEXT} tokens shifted by one."
    )
    # Take a batch from a whole pass: a loader left half way through an epoch would start the next pass there.
    x, y = list(val_loader)[0]
    say.table(
        ["split", "tokens", "windows", "batches", "tokens in batches"],
        [
            [
                "train",
                f"{train_tokens:,}",
                len(train_loader.starts),
                len(train_loader),
                len(train_loader) * BATCH * CONTEXT,
            ],
            ["val", f"{val_tokens:,}", len(val_loader.starts), len(val_loader), x.numel()],
        ],
    )
    say.show("one batch: inputs, targets", f"{tuple(x.shape)}, {tuple(y.shape)}")
    train_loss, val_loss = loss_over_loader(model, train_loader), loss_over_loader(model, val_loader)
    say.show("untrained model: train loss", f"{train_loss:.4f}")
    say.show("untrained model: val loss", f"{val_loss:.4f}")
    return {
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_batches": len(train_loader),
        "val_batches": len(val_loader),
        "initial_train_loss": train_loss,
        "initial_val_loss": val_loss,
    }


def _minimal_loop(say: Narrator, model: GPT, train_loader, val_loader, epochs: int, figures: dict) -> dict:
    say.step(f"A training loop, written out: {epochs} epoch{'s' * (epochs > 1)} of the {PRESET} GPT")
    say.say(
        f"The whole of training is this function, run once per epoch with AdamW (lr {LEARNING_RATE:g}, "
        f"weight decay {WEIGHT_DECAY}); after each epoch the val loss is measured with loss_over_loader:"
    )
    say.say(escape(inspect.getsource(train_one_epoch)))

    def show(log: EpochLog) -> None:
        say.say(
            f"  epoch {log.epoch}: {log.tokens_seen:,} tokens seen, train loss {log.train_loss:.3f}, "
            f"val loss {log.val_loss:.3f}"
        )

    logs = train_minimal(model, train_loader, val_loader, epochs, on_epoch=show)
    plot = _plot_losses(say, logs, figures)
    say.say(
        "The train loss falls fast at first: the model learns which tokens are common. The val loss falls less and "
        "soon stops, because a few thousand tokens is far too little text to learn English from: the model "
        "starts to remember the training text instead (overfitting)."
    )
    return {
        "epochs": [{k: v for k, v in vars(log).items() if k != "step_losses"} for log in logs],
        "step_losses": [loss for log in logs for loss in log.step_losses],
        "final_train_loss": logs[-1].train_loss,
        "final_val_loss": logs[-1].val_loss,
        "plot": str(plot),
    }


def _plot_losses(say: Narrator, logs: list[EpochLog], figures: dict) -> Path:
    figure, axis = new_figure(7, 4)
    steps_per_epoch = len(logs[0].step_losses)
    step_losses = [loss for log in logs for loss in log.step_losses]
    axis.plot(range(1, len(step_losses) + 1), step_losses, color="tab:blue", alpha=0.4, label="train, each batch")
    epoch_ends = [0] + [log.epoch * steps_per_epoch for log in logs]
    axis.plot(
        epoch_ends,
        [figures["initial_train_loss"]] + [log.train_loss for log in logs],
        "o-",
        color="tab:blue",
        label="train, epoch mean",
    )
    axis.plot(
        epoch_ends,
        [figures["initial_val_loss"]] + [log.val_loss for log in logs],
        "s-",
        color="tab:orange",
        label="val, after each epoch",
    )
    axis.axhline(figures["ln_vocab"], color="grey", linestyle="--", linewidth=1, label="ln(vocabulary)")
    axis.set_xlabel("training step (one batch of 2 x 256 tokens)")
    axis.set_ylabel("cross-entropy loss")
    axis.set_title("The minimal training loop")
    axis.grid(alpha=0.3)
    axis.legend()
    return say.plot(figure, "loss-curve")


def _with_kiln_train(say: Narrator, text_file: Path, context: LessonContext, steps: int, figures: dict) -> dict:
    say.step(f"The same text through Kiln's trainer ({steps} steps)")
    eval_interval = KILN_EVAL_EVERY[context.quick]
    settings = {"batch_size": BATCH, "lr": KILN_LR, "eval_interval": eval_interval, "eval_batches": 2, "seed": SEED}
    run_dir = context.out_dir / "kiln-train"
    say.say(
        "What `kiln train` runs, as one command:\n"
        f"  kiln train --data {escape(str(text_file))} --tokenizer gpt2 --preset {PRESET} "
        + " ".join(f"--set {k}={v}" for k, v in settings.items())
        + f" --max-iters {steps} --out {escape(str(run_dir))}"
    )
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this lesson's own earlier run: the trainer refuses to start over a run
    data = prepare_corpus(
        open_corpus(str(text_file)), "gpt2", context.out_dir / "prepared-gpt2", data_dir=context.data_dir
    )
    best = train_and_report(data, PRESET, settings, {"max_iters": steps}, run_dir)
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    say.say(
        "\nWhat the trainer adds to the loop above:\n"
        "  - a learning-rate schedule: warmup (the first fifth of a short run), then cosine decay to min_lr;\n"
        "  - no weight decay on biases, norms and embeddings (shrinking those towards 0 does not help);\n"
        "  - windows at random offsets instead of epochs, and the same fixed batches for every evaluation;\n"
        f"  - metrics ({METRICS_FILE}) and checkpoints: last/ after every evaluation, best/ at the lowest val loss;\n"
        "  - limits by steps, tokens, epochs or time, --resume, and a clear stop if the loss becomes NaN."
    )
    optim = OptimConfig(lr=KILN_LR)  # the `tiny` preset has no recipe of its own: defaults + --set
    marks = sorted({0, min(optim.warmup_iters, steps // 5), steps // 2, steps - 1})  # start, peak, middle, end
    say.table(
        ["step", "learning rate"],
        [[step + 1, f"{optim.lr * lr_factor(step, steps, optim):.2e}"] for step in marks],
        title="the schedule",
    )
    say.table(
        ["step", "train loss", "val loss", "lr", "tokens/s"],
        [
            [
                r["step"],
                f"{r['train_loss']:.3f}",
                f"{r['val_loss']:.3f}",
                f"{r['lr']:.2e}",
                f"{r['tokens_per_s'] or 0:,.0f}",
            ]
            for r in rows
        ],
        title=escape(str(run_dir / METRICS_FILE)),
    )
    say.show("checkpoint folder best/", ", ".join(sorted(p.name for p in best.iterdir())))
    same_point = [e for e in figures["epochs"] if e["epoch"] * figures["train_batches"] == steps]
    if same_point:
        say.show(
            f"the loop's val loss after as many steps (epoch {same_point[0]['epoch']})",
            f"{same_point[0]['val_loss']:.3f}, against the trainer's {rows[-1]['val_loss']:.3f}",
        )
    return {
        "kiln_steps": rows[-1]["step"],
        "kiln_best_val_loss": min(r["val_loss"] for r in rows),
        "kiln_metrics": rows,
        "kiln_run": str(run_dir),
    }


def _generation(say: Narrator, model: GPT, tokenizer: Tokenizer, new_tokens: int) -> dict:
    say.step("Generation: greedy, temperature and top-k, side by side")
    say.say(
        "The model from the loop above continues a prompt one token at a time. Greedy always takes the most "
        "likely token. Sampling draws from softmax(logits / temperature): below 1 sharpens the distribution, "
        "above 1 flattens it. Top-k first keeps only the k highest scores."
    )
    say.table(
        ["next token", *(f"p at temperature {t}" for t in TEMPERATURES)],
        [[escape(c) for c in row] for row in next_token_table(model, tokenizer, PROMPT)],
        title=escape(f"after {PROMPT!r}"),
    )
    written = continuations(model, tokenizer, PROMPT, sampling_settings(new_tokens))
    say.table(
        ["setting", f"{escape(repr(PROMPT))} + {new_tokens} new tokens (seed {SEED})"],
        [[name, escape(repr(text))] for name, text in written.items()],
    )
    return {"generations": written}
