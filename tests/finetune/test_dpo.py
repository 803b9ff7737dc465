"""Preference tuning with DPO: the loss and rewards as the paper writes them, on paper and on fixed
logits; a tiny model that learns to prefer the chosen kind of answer on pairs it never saw; a LoRA
reference that is the base itself; exact resume; and bad settings as one line."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from kiln.checkpoint import is_adapter, load_checkpoint, save_checkpoint, shape_for_adapter
from kiln.cli import main
from kiln.data.preferences import load_preferences
from kiln.data.templates import get_template
from kiln.evaluate.run import evaluate
from kiln.finetune import run as finetune_run
from kiln.finetune.dpo import Pairs, dpo_loss, dpo_loss_sum, reference_logprobs
from kiln.model.gpt import IGNORE
from kiln.model.lora import load_lora


def dpo(base, data, out, *extra) -> int:
    args = ["finetune", str(base), "--method", "dpo", "--data", str(data), "--out", str(out), "--template", "chat"]
    return main([*args, "--set", "block_size=96", "--set", "threads=1", *extra])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_and_rewards_of_a_pair_worked_on_paper():
    # log pi(c) = -1, log ref(c) = -2: the chosen answer became e times likelier; log pi(r) = -3,
    # log ref(r) = -2: the rejected one e times less likely. beta 0.5: rewards +0.5 and -0.5, margin 1.
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert chosen.item() == 0.5 and rejected.item() == -0.5
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1) = 0.3133
    # Where the policy is still the reference every margin is 0 and the loss is log 2.
    same = torch.tensor([-4.0, -7.5])
    assert dpo_loss(same, same + 1, same, same + 1, beta=0.1)[0].tolist() == pytest.approx([math.log(2)] * 2)


def test_the_loss_of_a_batch_equals_a_hand_computation_on_fixed_logits():
    """Two pairs, padded together: the engine's loss is the sum over pairs of -log sigmoid(beta * margin),
    each answer's log-probability summed by hand over its labelled tokens only."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5)  # rows: chosen 1, chosen 2, rejected 1, rejected 2
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, 3, 1, IGNORE, IGNORE],  # prompt, prompt, answer, answer, padding, padding
            [IGNORE, 2, 2, 4, 0, IGNORE],
            [IGNORE, IGNORE, 0, IGNORE, IGNORE, IGNORE],
            [IGNORE, 1, 4, 4, 3, 2],
        ]
    )
    reference = torch.tensor([-3.0, -6.0, -2.5, -7.0])  # chosen 1, chosen 2, rejected 1, rejected 2
    beta = 0.2

    def hand_logprob(row: int) -> float:
        total = 0.0
        for t, label in enumerate(labels[row].tolist()):
            if label != IGNORE:
                exps = [math.exp(v) for v in logits[row, t].tolist()]
                total += math.log(exps[label] / sum(exps))
        return total

    expected = 0.0
    for pair in range(2):
        chosen, rejected = hand_logprob(pair), hand_logprob(pair + 2)
        margin = beta * ((chosen - reference[pair].item()) - (rejected - reference[pair + 2].item()))
        expected += -math.log(1 / (1 + math.exp(-margin)))

    def fixed(inputs):
        return logits, None

    assert dpo_loss_sum(beta)(fixed, (None, labels, reference)).item() == pytest.approx(expected, rel=1e-6)


def test_autograd_gives_the_gradient_of_the_closed_form():
    """d loss / d log pi(chosen) = -beta * sigmoid(-margin), and + that for the rejected answer: DPO
    pushes the chosen answer up and the rejected one down, harder the more the pair is ranked wrong."""
    policy_chosen = torch.tensor([-5.0, -2.0, -9.0], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -8.0, -9.0], dtype=torch.float64, requires_grad=True)
    reference_chosen = torch.tensor([-4.5, -3.0, -8.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-4.5, -7.0, -10.0], dtype=torch.float64)
    beta = 0.3
    losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    losses.sum().backward()
    pushed = beta * torch.sigmoid(-(chosen - rejected))
    assert torch.allclose(policy_chosen.grad, -pushed) and torch.allclose(policy_rejected.grad, pushed)
    assert torch.autograd.gradcheck(
        lambda c, r: dpo_loss(c, r, reference_chosen, reference_rejected, beta)[0],
        (policy_chosen.detach().requires_grad_(), policy_rejected.detach().requires_grad_()),
    )


def test_dpo_teaches_a_tiny_model_to_prefer_the_chosen_kind_of_answer(tmp_path, base_checkpoint, preference_file):
    out = tmp_path / "dpo"
    assert (
        dpo(base_checkpoint, preference_file, out, "--max-iters", "40", "--set", "eval_interval=20", "--set", "lr=3e-3")
        == 0
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 20, 40]
    # Before any step the policy is the reference: every margin is 0, the loss log 2, no pair won.
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["val_reward_margin"] == 0 and rows[0]["val_preference_accuracy"] == 0
    # On the four held-out pairs (words it never saw), every polite answer now beats the rude one.
    assert rows[-1]["val_preference_accuracy"] == 1.0 and rows[-1]["val_reward_margin"] > 1
    assert rows[-1]["train_preference_accuracy"] == 1.0 and rows[-1]["val_loss"] < 0.1
    # kiln evaluate scores the held-out pairs as training did, against the same reference.
    scored = evaluate(out / "best", split="val", show=False)
    best = min(rows, key=lambda r: r["val_loss"])
    assert scored["kind"] == "preferences" and scored["reference"] and scored["pairs"] == 4
    assert scored["preference_accuracy"] == best["val_preference_accuracy"]
    assert scored["mean_margin"] == pytest.approx(best["val_reward_margin"], abs=1e-4)
    assert scored["chosen_likelier"] == best["val_chosen_likelier"]
    info = load_checkpoint(out / "best").info
    assert info["template"] == "chat" and info["finetune"]["method"] == "dpo" and info["finetune"]["beta"] == 0.1


def test_the_lora_reference_is_the_base_itself(tmp_path, base_checkpoint, preference_file):
    """After LoRA DPO, the adapted model with its adapter switched off scores every answer exactly as the
    base checkpoint does, while with it on it has moved."""
    out = tmp_path / "dpo-lora"
    args = ["--lora-r", "4", "--lora-dropout", "0", "--max-iters", "10", "--set", "eval_interval=10"]
    assert dpo(base_checkpoint, preference_file, out, *args, "--set", "lr=1e-2") == 0
    assert is_adapter(out / "best")
    template = get_template("chat")
    base = load_checkpoint(base_checkpoint).model
    adapted = load_checkpoint(base_checkpoint).model
    for model in (base, adapted):  # grown to the chat template's role tokens and stretched, as DPO did
        shape_for_adapter(model, out / "best")
    tokenizer = load_checkpoint(out / "best").tokenizer
    adapted = load_lora(adapted, str(out / "best"))
    pairs, _, _ = Pairs.encode(load_preferences(preference_file).pairs, template, tokenizer, 96)
    reference = reference_logprobs(adapted, pairs, batch_size=16)
    assert torch.equal(reference, pairs.logprobs(base, batch_size=16))
    assert not torch.allclose(pairs.logprobs(adapted, batch_size=16), reference)


def interrupt_after(step_count: int, monkeypatch) -> None:
    """Make the progress bar raise Ctrl-C after `step_count` steps, as a user stopping the run would."""

    @contextlib.contextmanager
    def stopping_bar(*args, **kwargs):
        done = {"steps": 0}

        def advance(n, label=None, total=None):
            done["steps"] += n
            if done["steps"] == step_count:
                raise KeyboardInterrupt

        yield advance

    monkeypatch.setattr(finetune_run, "progress_bar", stopping_bar)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_resumes_bit_for_bit(tmp_path, base_checkpoint, preference_file, monkeypatch, lora):
    method = ["--lora-r", "4", "--lora-dropout", "0.1"] if lora else ["--set", "grad_accum=2", "--set", "batch_size=4"]
    args = [*method, "--max-iters", "8", "--set", "eval_interval=4", "--set", "lr=3e-3"]
    assert dpo(base_checkpoint, preference_file, tmp_path / "straight", *args) == 0
    with monkeypatch.context() as patch:
        interrupt_after(6, patch)
        assert dpo(base_checkpoint, preference_file, tmp_path / "resumed", *args) == 130
    assert dpo(base_checkpoint, preference_file, tmp_path / "resumed", *args, "--resume") == 0
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [{k: r[k] for k in r if k != "elapsed_s"} for r in resumed] == [
        {k: r[k] for k in r if k != "elapsed_s"} for r in straight
    ]
    assert dpo(base_checkpoint, preference_file, tmp_path / "resumed", *args, "--resume", "--beta", "0.5") == 2


def test_dpo_keeps_the_template_the_base_was_instruction_tuned_with(tmp_path, base_checkpoint, preference_file, capsys):
    checkpoint = load_checkpoint(base_checkpoint)
    tuned = save_checkpoint(tmp_path / "tuned", checkpoint.model, checkpoint.tokenizer, info={"template": "alpaca"})
    args = ["finetune", str(tuned), "--method", "dpo", "--data", str(preference_file), "--out", str(tmp_path / "a")]
    assert main([*args, "--template", "chat", "--max-iters", "1"]) == 2
    assert "was instruction-tuned with the alpaca template" in capsys.readouterr().err
    assert main([*args, "--max-iters", "1", "--set", "threads=1"]) == 0
    assert "template alpaca" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--beta", "0"], "--beta 0.0 must be above 0"),
        (["--beta", "nan"], "beta = nan: expected float (a finite one)"),
        (["--format", "alpaca"], "--format: preference pairs have one format"),
        (["--prompt-loss"], "--prompt-loss: DPO compares answers only"),
        (["--set", "max_tokens=1000"], "limit DPO with --max-iters"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, base_checkpoint, preference_file, capsys, extra, message):
    assert dpo(base_checkpoint, preference_file, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_beta_without_dpo_and_dpo_on_plain_instructions_are_one_line(
    tmp_path, base_checkpoint, instruction_file, capsys
):
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(tmp_path / "run")]
    assert main([*args, "--beta", "0.1"]) == 2
    assert "--beta is DPO's setting; add --method dpo" in capsys.readouterr().err
    assert main([*args, "--method", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "record 1: the record has no 'chosen'" in err and err.count("\n") == 1
    args = ["finetune", str(base_checkpoint), "--method", "dpo", "--data", "instruction-data"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "'instruction-data' holds no chosen and rejected answers" in capsys.readouterr().err
