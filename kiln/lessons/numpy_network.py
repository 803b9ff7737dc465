"""Lesson 2: a neural network from scratch, NumPy only.

One neuron first, then a character model: the previous few characters, each looked up in an embedding
table, feed a tanh hidden layer whose outputs become a softmax over the vocabulary. The forward pass,
the backward pass (every gradient written out by hand) and SGD are all here, in plain NumPy, trained
on lesson 1's split of the same text and scored on lesson 1's held-out characters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from rich.markup import escape
from threadpoolctl import threadpool_limits

from kiln.lessons.catalog import LessonContext
from kiln.lessons.counting import (
    MAX_CHARS,
    MIN_CHARS,
    QUICK_CHARS,
    average_nll,
    build_vocabulary,
    count_bigrams,
    encode,
    printable,
    probability_table,
    split_text,
    uniform_nll,
)
from kiln.lessons.text import lesson_text

Params = dict[str, np.ndarray]
PARAM_NAMES = ("E", "W1", "b1", "W2", "b2")


@dataclass(frozen=True)
class Settings:
    """The network's shape and how long and how fast it trains."""

    context: int = 5  # characters of context; lesson 1's bigram had 1
    embed: int = 12  # numbers per character in the embedding table
    hidden: int = 200  # tanh units
    steps: int = 12_000
    batch: int = 128
    lr: float = 0.3  # the learning rate starts here and falls along a cosine
    lr_final: float = 0.01
    eval_every: int = 1_000
    eval_examples: int = 20_000  # the losses during training are measured on this many fixed examples
    seed: int = 1337


QUICK = Settings(steps=1_500, eval_every=500, eval_examples=5_000)


# ---- one neuron --------------------------------------------------------------------------------------------------


def neuron(x: np.ndarray, w: np.ndarray, b: float) -> float:
    """A weighted sum of the inputs plus a bias, squashed by tanh into (-1, 1)."""
    return float(np.tanh(x @ w + b))


def neuron_gradients(x: np.ndarray, w: np.ndarray, b: float, target: float) -> tuple[float, np.ndarray, float]:
    """Squared error of one neuron against `target`, and its gradient for w and b by the chain rule."""
    out = neuron(x, w, b)
    d_out = 2.0 * (out - target)  # d(out - target)^2 / d out
    d_z = d_out * (1.0 - out**2)  # tanh'(z) = 1 - tanh(z)^2
    return (out - target) ** 2, d_z * x, d_z


# ---- the network -------------------------------------------------------------------------------------------------


def init_params(vocab_size: int, settings: Settings, rng: np.random.Generator, dtype=np.float32) -> Params:
    """Random starting weights, scaled so the hidden layer neither saturates nor vanishes.

    The output layer starts near zero: every character then gets about the same probability, so the
    first loss is about ln(V), the uniform guess, instead of a confident wrong one.
    """
    fan_in = settings.context * settings.embed
    params = {
        "E": rng.normal(0.0, 1.0, (vocab_size, settings.embed)),
        "W1": rng.normal(0.0, 1.0, (fan_in, settings.hidden)) * (5 / 3) / math.sqrt(fan_in),
        "b1": np.zeros(settings.hidden),
        "W2": rng.normal(0.0, 1.0, (settings.hidden, vocab_size)) * 0.01,
        "b2": np.zeros(vocab_size),
    }
    return {name: value.astype(dtype) for name, value in params.items()}


def make_examples(ids: list[int] | np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X[i] = the `context` ids before position i+context, targets Y[i] = the id at that position."""
    ids = np.asarray(ids, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, context + 1)
    return windows[:, :context].copy(), windows[:, context].copy()


def forward(params: Params, X: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits for each row of X, and what the backward pass needs to remember."""
    flat = params["E"][X].reshape(len(X), -1)  # look each character up, lay the lookups side by side
    hidden = np.tanh(flat @ params["W1"] + params["b1"])
    logits = hidden @ params["W2"] + params["b2"]
    return logits, {"X": X, "flat": flat, "hidden": hidden}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log of softmax, computed after subtracting each row's max so exp never overflows."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, Y: np.ndarray) -> float:
    """Mean of -ln P(true next character): the same NLL in nats as lesson 1's."""
    return float(-log_softmax(logits)[np.arange(len(Y)), Y].mean())


def backward(params: Params, logits: np.ndarray, cache: dict, Y: np.ndarray) -> Params:
    """Gradients of the mean cross-entropy for every parameter, layer by layer from the output back."""
    X, flat, hidden = cache["X"], cache["flat"], cache["hidden"]
    d_logits = np.exp(log_softmax(logits))  # softmax then minus one at the true class, over the batch
    d_logits[np.arange(len(Y)), Y] -= 1.0
    d_logits /= len(Y)
    d_hidden = d_logits @ params["W2"].T
    d_pre = d_hidden * (1.0 - hidden**2)  # back through tanh
    d_flat = d_pre @ params["W1"].T
    d_E = np.zeros_like(params["E"])
    # A character used several times in a batch collects the gradient of every use.
    np.add.at(d_E, X, d_flat.reshape(*X.shape, -1))
    return {
        "E": d_E,
        "W1": flat.T @ d_pre,
        "b1": d_pre.sum(axis=0),
        "W2": hidden.T @ d_logits,
        "b2": d_logits.sum(axis=0),
    }


def loss_and_gradients(params: Params, X: np.ndarray, Y: np.ndarray) -> tuple[float, Params]:
    """One forward and one backward pass."""
    logits, cache = forward(params, X)
    return cross_entropy(logits, Y), backward(params, logits, cache, Y)


def numerical_gradient(params: Params, X: np.ndarray, Y: np.ndarray, name: str, index: tuple, eps: float) -> float:
    """d loss / d params[name][index] by central finite differences: (L(w + eps) - L(w - eps)) / 2 eps."""
    value = params[name][index]
    params[name][index] = value + eps
    plus = cross_entropy(forward(params, X)[0], Y)
    params[name][index] = value - eps
    minus = cross_entropy(forward(params, X)[0], Y)
    params[name][index] = value
    return (plus - minus) / (2 * eps)


def learning_rate(step: int, settings: Settings) -> float:
    """Cosine decay from settings.lr to settings.lr_final: big steps early, careful ones at the end."""
    progress = step / max(1, settings.steps - 1)
    return settings.lr_final + 0.5 * (settings.lr - settings.lr_final) * (1 + math.cos(math.pi * progress))


def sgd_step(params: Params, grads: Params, lr: float) -> None:
    """Move every parameter a small step downhill."""
    for name in params:
        params[name] -= lr * grads[name]


def evaluate(params: Params, X: np.ndarray, Y: np.ndarray, chunk: int = 20_000) -> float:
    """Mean cross-entropy over all of X, in chunks to bound memory."""
    total = 0.0
    for start in range(0, len(X), chunk):
        logits, _ = forward(params, X[start : start + chunk])
        total += cross_entropy(logits, Y[start : start + chunk]) * len(logits)
    return total / len(X)


@dataclass
class History:
    steps: list[int]
    train: list[float]
    heldout: list[float]
    batch_losses: list[float]


def train(
    params: Params,
    train_xy: tuple[np.ndarray, np.ndarray],
    heldout_xy: tuple[np.ndarray, np.ndarray],
    settings: Settings,
    rng: np.random.Generator,
    on_eval=None,
) -> History:
    """Minibatch SGD: draw a random batch, compute the gradients, step, and every so often measure both losses.

    The losses along the way are measured on fixed random samples of each split, so that measuring costs
    little next to training; the caller scores the whole held-out split at the end.
    """
    X, Y = train_xy
    probes = [_probe(xy, settings.eval_examples, rng) for xy in (train_xy, heldout_xy)]
    history = History([], [], [], [])
    measure_at = set(evaluation_steps(settings))
    with one_blas_thread():
        for step in range(settings.steps + 1):
            if step in measure_at:
                history.steps.append(step)
                history.train.append(evaluate(params, *probes[0]))
                history.heldout.append(evaluate(params, *probes[1]))
                if on_eval:
                    on_eval(step, history)
            if step == settings.steps:
                break
            batch = rng.integers(0, len(X), settings.batch)
            loss, grads = loss_and_gradients(params, X[batch], Y[batch])
            history.batch_losses.append(loss)
            sgd_step(params, grads, learning_rate(step, settings))
    return history


def evaluation_steps(settings: Settings) -> list[int]:
    """Every `eval_every` steps and at the end, plus a few early steps where the loss falls fastest."""
    early = [settings.eval_every // 8, settings.eval_every // 4, settings.eval_every // 2]
    regular = range(0, settings.steps + 1, settings.eval_every)
    return sorted(step for step in {*early, *regular, settings.steps} if step <= settings.steps)


def _probe(xy: tuple[np.ndarray, np.ndarray], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sample of `size` examples (all of them if there are fewer)."""
    X, Y = xy
    if len(X) <= size:
        return X, Y
    chosen = rng.choice(len(X), size=size, replace=False)
    return X[chosen], Y[chosen]


def sample_text(
    params: Params, vocabulary: list[str], prompt_ids: list[int], length: int, rng: np.random.Generator
) -> str:
    """Generate `length` characters, each drawn from the softmax given the characters before it."""
    context = list(prompt_ids)
    width = params["W1"].shape[0] // params["E"].shape[1]
    out = []
    for _ in range(length):
        logits, _ = forward(params, np.array([context[-width:]]))
        probs = np.exp(log_softmax(logits.astype(np.float64)))[0]
        nxt = int(rng.choice(len(probs), p=probs / probs.sum()))
        context.append(nxt)
        out.append(vocabulary[nxt])
    return "".join(out)


def one_blas_thread():
    """Run NumPy's matrix products on one thread while inside.

    This network's products are small (a batch of 128 rows by a few hundred): splitting each across
    threads costs more than it saves, and on a busy machine the threads wait for each other, which made
    training twenty times slower here. threadpoolctl sets the BLAS NumPy uses and puts it back after.
    """
    return threadpool_limits(limits=1, user_api="blas")


# ---- the lesson --------------------------------------------------------------------------------------------------


def _show_neuron(context: LessonContext) -> dict:
    n = context.narrator
    x, w, b = np.array([0.5, -1.0, 2.0]), np.array([0.8, 0.2, -0.5]), 0.1
    z = float(x @ w + b)
    out = neuron(x, w, b)
    n.show("inputs x", x.tolist())
    n.show("weights w", w.tolist())
    n.show("bias b", b)
    terms = " + ".join(f"({xi:g})×({wi:g})" for xi, wi in zip(x, w, strict=True))
    n.show("z = w·x + b", f"{terms} + {b:g} = {z:.3f}")
    n.show("output tanh(z)", f"{out:.4f}")
    target = 0.5
    error, d_w, d_b = neuron_gradients(x, w, b, target)
    n.say(
        f"  Say we wanted {target}. The squared error is {error:.4f}. The chain rule gives how the error moves"
        " with each weight: d error/d w = 2(out - target) · (1 - out²) · x."
    )
    n.show("d error / d w", np.round(d_w, 4).tolist())
    n.show("d error / d b", f"{d_b:.4f}")
    lr = 0.5
    after, _, _ = neuron_gradients(x, w - lr * d_w, b - lr * d_b, target)
    n.show(f"error after one step against the gradient (lr {lr})", f"{after:.4f}")
    return {"neuron_output": out, "neuron_error": error, "neuron_error_after_step": after}


def _plot_losses(context: LessonContext, history: History, bigram: float, uniform: float):
    from kiln.lessons.narrate import new_figure

    figure, axis = new_figure(7.5, 4.5)
    batches = np.array(history.batch_losses)
    window = max(1, len(batches) // 60)
    smooth = np.convolve(batches, np.ones(window) / window, mode="valid")
    axis.plot(np.arange(len(smooth)) + window, smooth, color="0.75", lw=1, label=f"minibatch loss (mean of {window})")
    axis.plot(history.steps, history.train, "o-", label="training loss")
    axis.plot(history.steps, history.heldout, "s-", label="held-out loss")
    axis.axhline(bigram, color="tab:red", ls="--", label=f"lesson 1 bigram, held-out ({bigram:.3f})")
    axis.axhline(uniform, color="0.4", ls=":", label=f"uniform guess ln(V) ({uniform:.3f})")
    axis.set_xlabel("SGD step")
    axis.set_ylabel("cross-entropy (nats per character)")
    axis.set_title("Training the NumPy character model")
    axis.legend()
    return context.narrator.plot(figure, "loss_curves")


def _gradient_check(params: Params, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator) -> float:
    """Largest relative difference between backprop and finite differences over a few entries per parameter."""
    params64 = {name: value.astype(np.float64) for name, value in params.items()}
    _, grads = loss_and_gradients(params64, X, Y)
    worst = 0.0
    for name in PARAM_NAMES:
        for _ in range(4):
            index = tuple(int(rng.integers(0, s)) for s in params64[name].shape)
            if name == "E":  # only rows the batch uses have a gradient worth checking
                index = (int(X[rng.integers(0, X.shape[0]), rng.integers(0, X.shape[1])]), index[1])
            numeric = numerical_gradient(params64, X, Y, name, index, 1e-5)
            exact = grads[name][index]
            worst = max(worst, abs(numeric - exact) / max(1e-12, abs(numeric) + abs(exact)))
    return worst


def run(context: LessonContext, settings: Settings | None = None) -> dict:
    with one_blas_thread():
        return _lesson(context, settings or (QUICK if context.quick else Settings()))


def _lesson(context: LessonContext, settings: Settings) -> dict:
    n = context.narrator
    rng = np.random.default_rng(settings.seed)

    n.step("One neuron")
    n.say("  A neuron multiplies each input by a weight, adds them up with a bias, and squashes the sum.")
    figures = _show_neuron(context)

    n.step("The text, split as in lesson 1")
    spec = context.corpus or "tinyshakespeare"
    text = lesson_text(spec, context.data_dir, MIN_CHARS, QUICK_CHARS if context.quick else MAX_CHARS)
    train_text, heldout_text = split_text(text)
    vocabulary = build_vocabulary(train_text)
    size = len(vocabulary)
    train_ids, heldout_ids = encode(train_text, vocabulary), encode(heldout_text, vocabulary)
    train_xy = make_examples(train_ids, settings.context)
    heldout_xy = make_examples(heldout_ids, settings.context)
    n.show("corpus", spec)
    n.show("training / held-out characters", f"{len(train_text):,} / {len(heldout_text):,}")
    n.show("V", size)
    first = "".join(printable(vocabulary[i]) for i in train_xy[0][0])
    n.show(
        "one example",
        escape(f"after '{first}' comes '{printable(vocabulary[train_xy[1][0]])}'"),
    )
    n.show("training examples", f"{len(train_xy[1]):,}")

    n.step("A network: embedding -> tanh hidden layer -> softmax")
    params = init_params(size, settings, rng)
    count = sum(p.size for p in params.values())
    n.table(
        ["parameter", "shape", "what it does"],
        [
            ("E", params["E"].shape, f"a row of {settings.embed} numbers for each character"),
            ("W1, b1", f"{params['W1'].shape}, {params['b1'].shape}", f"{settings.context} looked-up rows -> hidden"),
            ("W2, b2", f"{params['W2'].shape}, {params['b2'].shape}", "hidden -> one score (logit) per character"),
        ],
    )
    n.show("parameters", f"{count:,}")
    uniform = uniform_nll(size)
    start_loss = evaluate(params, *heldout_xy)
    n.show("held-out loss before training", f"{start_loss:.4f}  (ln V = {uniform:.4f})")
    n.say("  The output weights start near zero, so every character is about equally likely: the loss starts at ln V.")

    n.step("Backpropagation, checked")
    n.say(
        "  Backward goes from the loss to each weight by the chain rule: softmax - one-hot at the output,"
        " through W2, through tanh (1 - h²), through W1, and into the embedding rows that were looked up."
    )
    check_x, check_y = train_xy[0][:32], train_xy[1][:32]
    worst = _gradient_check(params, check_x, check_y, rng)
    n.show("largest relative gap, backprop vs finite differences (float64)", f"{worst:.1e}")

    n.step("Train with minibatch SGD")
    n.show("steps × batch", f"{settings.steps:,} × {settings.batch}")
    n.show("learning rate", f"cosine from {settings.lr} down to {settings.lr_final}")

    def report(step: int, history: History) -> None:
        n.say(f"  step {step:>6,}  train {history.train[-1]:.4f}  held-out {history.heldout[-1]:.4f}")

    started = time.perf_counter()
    history = train(params, train_xy, heldout_xy, settings, rng, on_eval=report)
    seconds = time.perf_counter() - started
    n.show("training time", f"{seconds:.1f} s")

    n.step("Beside lesson 1: the same held-out characters")
    # Score the bigram on exactly the characters the network predicts: each has `context` characters before it.
    bigram_table = probability_table(count_bigrams(train_ids, size), smoothing=1.0)
    bigram = average_nll(bigram_table, heldout_ids[settings.context - 1 :])
    network = evaluate(params, *heldout_xy)  # all of the held-out split, not just the sample used on the way
    n.table(
        ["model", "held-out NLL (nats)"],
        [
            (f"uniform guess, ln({size})", f"{uniform:.4f}"),
            ("lesson 1: bigram counts (1 character back)", f"{bigram:.4f}"),
            (f"this network ({settings.context} characters back)", f"{network:.4f}"),
        ],
    )
    plot = _plot_losses(context, history, bigram, uniform)
    best = int(np.argmin(history.heldout))
    if history.heldout[best] < history.heldout[-1] - 0.01:
        n.say(
            f"  The held-out loss was lowest at step {history.steps[best]:,} ({history.heldout[best]:.4f}) and then"
            " rose while the training loss kept falling: the network began to memorise its training text"
            " (overfitting). More text, a smaller network or fewer steps would help."
        )
    else:
        n.say(
            f"  The training loss ended {history.train[-1]:.4f}, a little below the held-out loss: some of what the"
            " network learned is particular to its training text, but the held-out loss fell to the end."
        )

    n.step("Write with it")
    prompt = encode("\n" * settings.context, vocabulary) if "\n" in vocabulary else train_ids[: settings.context]
    text_sample = sample_text(params, vocabulary, prompt, 240, np.random.default_rng(settings.seed))
    n.say(f"[italic]{escape(text_sample)}[/]")

    return figures | {
        "corpus": spec,
        "vocab_size": size,
        "parameters": count,
        "uniform_nll": uniform,
        "initial_heldout_loss": start_loss,
        "gradient_check_relative_error": float(worst),
        "steps": settings.steps,
        "train_loss": history.train[-1],
        "heldout_loss": network,
        "bigram_heldout_nll": bigram,
        "training_seconds": seconds,
        "sample": text_sample,
        "loss_plot": plot,
    }
