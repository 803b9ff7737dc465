"""The training loop on real data: it learns, it stops at each limit, it resumes bit for bit, it fails clearly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kiln.checkpoint import load_checkpoint
from kiln.data.corpus import open_corpus
from kiln.data.prepare import prepare_corpus
from kiln.errors import ConfigError
from kiln.model.gpt import GPT, GPTConfig
from kiln.train import trainer
from kiln.train.optim import OptimConfig
from kiln.train.trainer import (
    METRICS_FILE,
    TrainConfig,
    TrainingDiverged,
    estimate_loss,
    evaluation_batches,
    pretraining_rows,
    steps_per_epoch,
    train,
)


@pytest.fixture(scope="module")
def verdict_char(mirror, tmp_path_factory):
    return prepare_corpus(open_corpus("the-verdict", mirror), "char", tmp_path_factory.mktemp("data") / "v")


def configs(data, **train_settings):
    model = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_iters=5)
    settings = dict(batch_size=8, eval_interval=4, eval_batches=4, max_iters=12) | train_settings
    return model, optim, TrainConfig(**settings)


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [{k: r[k] for k in ("step", "train_loss", "val_loss", "lr", "tokens")} for r in rows]


def test_a_short_run_learns_and_writes_its_folder(verdict_char, tmp_path):
    result = train(*configs(verdict_char, max_iters=40, eval_interval=20), verdict_char, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [20, 40]
    uniform = math.log(verdict_char.tokenizer.vocab_size)  # an untrained model's loss, 4.11 here
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < uniform
    assert rows[-1]["val_loss"] < uniform - 0.5
    assert result.steps == 40 and result.tokens == 40 * 8 * 32
    assert load_checkpoint(tmp_path / "run" / "last").state.progress["step"] == 40
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_resume_continues_bit_for_bit(verdict_char, tmp_path):
    train(*configs(verdict_char), verdict_char, tmp_path / "straight")

    def interrupt_after_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*configs(verdict_char), verdict_char, tmp_path / "resumed", on_step=interrupt_after_6)
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [4]
    train(*configs(verdict_char), verdict_char, tmp_path / "resumed", resume=True)
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "straight")
    straight, resumed = load_checkpoint(tmp_path / "straight" / "last"), load_checkpoint(tmp_path / "resumed" / "last")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_each_limit_stops_the_run(verdict_char, tmp_path):
    by_tokens = train(*configs(verdict_char, max_iters=None, max_tokens=5 * 8 * 32), verdict_char, tmp_path / "t")
    assert by_tokens.steps == 5
    by_time = train(
        *configs(verdict_char, max_iters=None, max_time=1.5, eval_interval=10_000), verdict_char, tmp_path / "s"
    )
    assert by_time.steps > 0 and by_time.seconds < 5
    assert metrics(tmp_path / "s")[-1]["step"] == by_time.steps


def test_divergence_stops_with_the_step_and_a_lower_lr(verdict_char, tmp_path, monkeypatch):
    original = GPT.forward

    def nan_from_step_3(self, idx, targets=None, **options):
        logits, loss = original(self, idx, targets, **options)
        calls["n"] += self.training
        if self.training and calls["n"] >= 3:  # the engine asks for the summed loss; both turn nan
            return (None if logits is None else logits * math.nan), loss * math.nan
        return logits, loss

    calls = {"n": 0}
    monkeypatch.setattr(GPT, "forward", nan_from_step_3)
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 3; .*last holds the last good .*--set lr=1.0e-03"
    ):
        train(*configs(verdict_char), verdict_char, tmp_path / "x")


def test_run_mistakes_are_clear(verdict_char, tmp_path):
    model, optim, run = configs(verdict_char)
    with pytest.raises(ConfigError, match="give a limit"):
        train(model, optim, TrainConfig(), verdict_char, tmp_path / "a")
    train(model, optim, run, verdict_char, tmp_path / "b")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(model, optim, run, verdict_char, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"model config disagrees \(n_layer 2 vs 3\)"):
        train(GPTConfig(**(model.to_dict() | {"n_layer": 3})), optim, run, verdict_char, tmp_path / "b", resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(model, optim, run, verdict_char, tmp_path / "c", resume=True)
    with pytest.raises(Exception, match="shorter than one window"):
        train(GPTConfig(**(model.to_dict() | {"block_size": 4096})), optim, run, verdict_char, tmp_path / "d")


def test_metrics_carry_speed_and_mfu_and_the_estimate_comes_early(verdict_char, tmp_path, monkeypatch):
    from kiln.train import engine

    monkeypatch.setattr(engine, "peak_flops", lambda device, dtype, threads: 1e12)
    estimates = []
    train(
        *configs(verdict_char, max_iters=16, eval_interval=8),
        verdict_char,
        tmp_path / "r",
        on_estimate=lambda steps, seconds: estimates.append((steps, seconds)),
    )
    assert len(estimates) == 1 and estimates[0][0] == 16 and 0 < estimates[0][1] < 60
    rows = [json.loads(line) for line in (tmp_path / "r" / METRICS_FILE).read_text().splitlines()]
    flops_per_step = engine.flops_per_token(configs(verdict_char)[0]) * 8 * 32
    for row in rows:
        # MFU is the step rate's FLOPs over the (here pretended) 1 TFLOP/s peak.
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] / (8 * 32) * flops_per_step / 1e12)
        assert row["tokens_per_s"] > 0


def test_bf16_autocast_trains_on_cpu_and_bad_precision_is_refused(verdict_char, tmp_path):
    result = train(*configs(verdict_char, max_iters=6, precision="bf16"), verdict_char, tmp_path / "bf16")
    assert math.isfinite(result.last_val_loss) and result.last_val_loss < math.log(verdict_char.tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="precision 'fp8': choose one of auto, fp32, bf16"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)


def test_compiled_training_follows_the_eager_run(verdict_char, tmp_path):
    eager = train(*configs(verdict_char, max_iters=8, eval_interval=8), verdict_char, tmp_path / "eager")
    compiled = train(
        *configs(verdict_char, max_iters=8, eval_interval=8, compile=True), verdict_char, tmp_path / "compiled"
    )
    assert compiled.steps == 8
    # Inductor fuses and reorders float arithmetic, so the two agree closely but not bit for bit.
    assert compiled.last_val_loss == pytest.approx(eager.last_val_loss, abs=1e-3)


def test_resuming_with_a_longer_limit_decays_on_from_where_the_schedule_stood(verdict_char, tmp_path):
    train(*configs(verdict_char, max_iters=12), verdict_char, tmp_path / "r")
    before = [r["lr"] for r in metrics(tmp_path / "r")]
    train(*configs(verdict_char, max_iters=24), verdict_char, tmp_path / "r", resume=True)
    lrs = [r["lr"] for r in metrics(tmp_path / "r")]
    assert lrs[: len(before)] == before
    # No jump back up to where a 24-step run would be at step 12; on down to min_lr at the new end.
    assert all(later <= earlier for earlier, later in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] == pytest.approx(configs(verdict_char)[1].min_lr, rel=1e-6)


def test_a_run_counted_in_epochs_passes_over_the_non_overlapping_windows(verdict_char, tmp_path):
    model, optim, run = configs(verdict_char, max_iters=None, epochs=0.5)
    tokens = verdict_char.tokens("train")
    rows = pretraining_rows(tokens, model, run)
    windows = len(range(0, len(tokens) - 32, 32))  # LLMs-from-scratch's windows at stride = context
    assert steps_per_epoch(rows) == windows // 8
    assert all(start % 32 == 0 for step in range(10) for start in rows.rows(step))
    assert train(model, optim, run, verdict_char, tmp_path / "r").steps == math.ceil(0.5 * (windows // 8))
    by_steps = pretraining_rows(tokens, model, configs(verdict_char)[2])
    assert any(start % 32 for start in by_steps.rows(0))  # without --epochs: random offsets, as before


def test_a_small_val_split_is_scored_over_all_its_windows(verdict_char):
    model, _, run = configs(verdict_char, eval_batches=8)
    val = np.asarray(verdict_char.tokens("val"), dtype=np.int64)
    starts = range(0, len(val) - 32, 32)  # 63 windows in 2,048 characters: 8 batches of 8 hold them all
    batches = evaluation_batches(val, model, run, seed=0, label="val")
    assert [len(x) for x, _ in batches] == [8] * 7 + [7]
    inputs, targets = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(inputs, torch.stack([torch.from_numpy(val[s : s + 32]) for s in starts]))
    torch.manual_seed(0)
    gpt = GPT(model).eval()
    with torch.no_grad():
        whole = gpt(inputs, targets)[1].item()  # the mean over every token of every window at once
    assert estimate_loss(gpt, batches, torch.device("cpu")) == pytest.approx(whole, rel=1e-5)
    # More windows than eval_batches batches hold: fixed batches at random offsets, as before.
    sampled = evaluation_batches(val, model, configs(verdict_char, eval_batches=4)[2], seed=0, label="val")
    assert len(sampled) == 4 and not torch.equal(torch.cat([x for x, _ in sampled]), inputs[:32])


def test_best_shares_the_files_of_last_and_keeps_them_when_last_moves_on(verdict_char, tmp_path, monkeypatch):
    scores = iter([1.0, 2.0, 1.5, 3.0])  # (train, val) at each evaluation: val improves, then does not
    monkeypatch.setattr(trainer, "estimate_loss", lambda *args: next(scores))
    run, seen = tmp_path / "r", {}

    def after_the_first_evaluation(step, loss):
        if step == 5:
            best, last = run / "best" / "model.safetensors", run / "last" / "model.safetensors"
            seen["linked"] = best.stat().st_ino == last.stat().st_ino  # one file, written once
            seen["weights"] = best.read_bytes()

    train(*configs(verdict_char, max_iters=8, eval_interval=4), verdict_char, run, on_step=after_the_first_evaluation)
    assert seen["linked"]
    assert (run / "best" / "model.safetensors").read_bytes() == seen["weights"]
    assert (run / "last" / "model.safetensors").read_bytes() != seen["weights"]
    assert load_checkpoint(run / "best").state.progress["step"] == 4


def test_a_run_that_need_not_resume_writes_the_weights_alone(verdict_char, tmp_path):
    train(*configs(verdict_char, max_iters=8, eval_interval=4, resumable=False), verdict_char, tmp_path / "r")
    for name in ("last", "best"):
        checkpoint = load_checkpoint(tmp_path / "r" / name)
        assert checkpoint.state is None and checkpoint.model.config.n_layer == 2
    assert sorted(p.name for p in (tmp_path / "r" / "last").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    with pytest.raises(ConfigError, match="no training state, so it cannot be resumed"):
        train(*configs(verdict_char, max_iters=12, resumable=False), verdict_char, tmp_path / "r", resume=True)


def test_a_run_that_need_not_resume_writes_last_only_when_val_improves_and_at_the_end(
    verdict_char, tmp_path, monkeypatch
):
    from kiln.train import trainer

    written, save_checkpoint = [], trainer.save_checkpoint
    monkeypatch.setattr(
        trainer, "save_checkpoint", lambda folder, *a: written.append(folder.name) or save_checkpoint(folder, *a)
    )
    model, optim, settings = configs(verdict_char, max_iters=30, eval_interval=2, resumable=False)
    optim.lr = 3e-2  # too high to improve at every evaluation
    train(model, optim, settings, verdict_char, tmp_path / "r")
    val = [row["val_loss"] for row in metrics(tmp_path / "r")]
    improved = [v < min(val[:i], default=float("inf")) for i, v in enumerate(val)]
    assert not all(improved), "every evaluation improved: the test would not see a skipped write"
    assert written == ["last"] * (sum(improved) + (not improved[-1]))
    settings.resumable = True  # the same run, writing last/ at every evaluation, ends with the same weights
    train(model, optim, settings, verdict_char, tmp_path / "resumable")
    for name in ("last", "best"):
        ours, theirs = (load_checkpoint(tmp_path / run / name).model.state_dict() for run in ("r", "resumable"))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_without_clipping_each_weight_is_updated_in_backward_to_the_same_weights(verdict_char, tmp_path, monkeypatch):
    from kiln.train import engine

    model, optim, settings = configs(verdict_char, max_iters=6)
    optim.grad_clip = 0.0
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    train(model, optim, settings, verdict_char, tmp_path / "in-backward")
    parameters = len(list(GPT(model).parameters()))
    assert len(steps) == 6 * parameters  # one update per weight as its gradient completes
    steps.clear()
    monkeypatch.setattr(engine, "UpdateInBackward", lambda optimizers: None)
    train(model, optim, settings, verdict_char, tmp_path / "after")
    assert len(steps) == 6
    ours, theirs = (load_checkpoint(tmp_path / run / "last") for run in ("in-backward", "after"))
    assert all(torch.equal(ours.model.state_dict()[k], v) for k, v in theirs.model.state_dict().items())
    assert same_tree(ours.state.optimizers, theirs.state.optimizers)  # AdamW's state, as one step leaves it


def same_tree(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b
