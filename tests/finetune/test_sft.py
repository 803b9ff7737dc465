"""`kiln finetune` end to end on a tiny model: it learns, saves what chat needs, and refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.checkpoint import is_adapter, is_checkpoint, load_checkpoint
from kiln.cli import main
from kiln.data.instructions import Message, load_instructions
from kiln.data.templates import encode_pieces, get_template
from kiln.finetune.examples import encode_conversations
from kiln.finetune.sft import masked_loss
from kiln.generate.sampling import SamplingConfig, generate
from kiln.serve.models import resolve_checkpoint


def val_loss(folder, instruction_file):
    checkpoint = load_checkpoint(folder)
    template = get_template(checkpoint.info["template"])
    val = load_instructions(instruction_file).split()["val"]
    examples, _ = encode_conversations(val, template, checkpoint.tokenizer, checkpoint.model.config.block_size)
    return masked_loss(checkpoint.model, examples, checkpoint.tokenizer.eos_id)


def test_the_val_split_holds_examples_that_are_not_trained_on(instruction_file):
    splits = load_instructions(instruction_file).split()
    seen = {text for c in splits["train"] for m in c.messages for text in (m.content, m.context) if text}
    held_out = [text for c in splits["val"] for text in (c.messages[0].context, c.response) if text]
    assert len(splits["val"]) == 4 and len(held_out) >= 4
    assert not seen.intersection(held_out), "a val input or answer is also a training one"


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_learns_and_saves_a_model_that_chat_can_use(tmp_path, base_checkpoint, instruction_file, lora, capsys):
    out = tmp_path / "run"
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(out)]
    args += ["--max-iters", "60", "--set", "block_size=128", "--set", "eval_interval=20"]
    # LoRA moves a random base slowly, so it gets a larger step
    args += ["--lora-r", "4", "--lora-dropout", "0", "--set", "lr=2e-2"] if lora else ["--set", "lr=3e-3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "added 3 tokens" in printed  # "#" from the template, "2" and "4" from the data
    best = out / "best"
    assert (is_adapter if lora else is_checkpoint)(best)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40, 60]
    # Val is held out, so what carries over is the format and the answers' letters, not the answers; LoRA
    # on a random base (frozen, near-uniform head) can move its outputs only a little.
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] * (0.97 if lora else 0.9)
    checkpoint = load_checkpoint(best)
    assert checkpoint.info["template"] == "alpaca" and checkpoint.model.config.block_size == 128
    assert checkpoint.tokenizer.vocab_size == checkpoint.model.config.vocab_size
    assert val_loss(best, instruction_file) == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-5)
    base = load_checkpoint(base_checkpoint)
    assert base.model.config.vocab_size < checkpoint.model.config.vocab_size  # the base folder is untouched
    assert f"kiln chat {best}" in printed


def test_a_finetuned_model_learns_to_stop(tmp_path, base_checkpoint):
    """Batches pad with EOS, and the EOS that ends each answer must still be learned: greedy replies to
    prompts the model never saw end with EOS, well before the token limit."""
    replies = {"Greet": "Hello!", "Thank": "Thanks!", "Wave at": "Bye!"}
    names = ["Anna", "Bob", "Clara", "Dan", "Eve", "Frank", "Gina", "Hal", "Ivy", "Jon", "Kate", "Leo"]
    records = [{"instruction": f"{verb} {name}.", "output": reply} for verb, reply in replies.items() for name in names]
    data = tmp_path / "greetings.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    args = ["finetune", str(base_checkpoint), "--data", str(data), "--out", str(out), "--template", "chat"]
    assert main([*args, "--max-iters", "150", "--set", "lr=3e-3", "--set", "eval_interval=150"]) == 0
    checkpoint = load_checkpoint(out / "best")
    template, tokenizer = get_template(checkpoint.info["template"]), checkpoint.tokenizer
    config = SamplingConfig(max_new_tokens=30, temperature=0.0)
    for verb, reply in replies.items():
        for name in ["Olga", "Pete", "Rosa"]:  # names it was not fine-tuned on
            prompt = template.render([Message("user", f"{verb} {name}.")], generation_prompt=True)
            ids = torch.tensor([encode_pieces(prompt, tokenizer).ids])
            tokens = list(generate(checkpoint.model, ids, config, stop_ids={tokenizer.eos_id}))
            assert tokens[-1] == tokenizer.eos_id, f"{verb} {name}: no EOS in {tokenizer.decode(tokens)!r}"
            assert tokenizer.decode(tokens[:-1]) == reply


def test_early_stop_ends_when_val_loss_stops_improving(tmp_path, base_checkpoint, instruction_file):
    out = tmp_path / "run"
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(out), "--epochs", "50"]
    args += ["--early-stop", "2", "--set", "eval_interval=5", "--set", "lr=3e-2", "--set", "block_size=128"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_at = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    assert len(rows) == best_at + 3  # two evaluations without improvement, then stop
    assert rows[-1]["step"] < 50 * 5  # far short of 50 epochs of 5 batches


def test_keep_last_gives_back_the_final_weights_even_when_val_loss_rose(
    tmp_path, base_checkpoint, instruction_file, capsys
):
    out = tmp_path / "run"
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(out), "--epochs", "12"]
    args += ["--set", "eval_interval=5", "--set", "lr=3e-2", "--set", "block_size=128", "--set", "keep=last"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best, last = min(row["val_loss"] for row in rows), rows[-1]["val_loss"]
    assert last > best  # learnt by heart: its val loss rose past the best
    assert f"{best:.4f} best, {last:.4f} last" in printed and f"last weights: {out / 'last'};" in printed
    assert val_loss(out / "last", instruction_file) == pytest.approx(last, rel=1e-4)
    assert val_loss(out / "best", instruction_file) == pytest.approx(best, rel=1e-4)
    assert resolve_checkpoint(out) == out / "last"  # `kiln serve RUN` serves the weights the run kept
    other = tmp_path / "other"
    assert main([*args[:5], str(other), "--max-iters", "2", "--set", "block_size=128"]) == 0
    assert resolve_checkpoint(other) == other / "best"


def test_keep_names_best_or_last(tmp_path, base_checkpoint, instruction_file, capsys):
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(tmp_path / "o")]
    assert main([*args, "--set", "keep=newest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "keep='newest': use one of best, last" in err and "\n" not in err


def test_with_prompt_loss_more_tokens_count(base_checkpoint, instruction_file):
    checkpoint = load_checkpoint(base_checkpoint)
    tokenizer = checkpoint.tokenizer.with_added(chars="#0123456789()", specials=[])
    convs = load_instructions(instruction_file).conversations[:4]
    answers, _ = encode_conversations(convs, get_template("alpaca"), tokenizer, 512)
    everything, _ = encode_conversations(convs, get_template("alpaca"), tokenizer, 512, prompt_loss=True)
    count = lambda examples: sum(label != -100 for e in examples for label in e.labels)  # noqa: E731
    assert count(everything) == sum(len(e.inputs) for e in everything) > 5 * count(answers)
    torch.testing.assert_close(torch.tensor(everything[0].inputs), torch.tensor(answers[0].inputs))


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        (lambda p: p.write_text('{"prompt": "a", "completion": "b"}\n'), "match no instruction format"),
        (lambda p: p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n'), ":2: fields"),
        (lambda p: p.write_text(""), "has no records"),
    ],
)
def test_bad_instruction_files_get_one_line_and_exit_2(tmp_path, base_checkpoint, capsys, setup, says):
    data = tmp_path / "data.jsonl"
    setup(data)
    assert main(["finetune", str(base_checkpoint), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_too_few_examples_for_a_val_split_is_one_clear_line(tmp_path, base_checkpoint, capsys):
    data = tmp_path / "few.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n' * 9)
    assert main(["finetune", str(base_checkpoint), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "9 examples leave no val split" in err and "at least 10 examples" in err and "\n" not in err


def test_a_base_that_is_not_a_checkpoint(tmp_path, instruction_file, capsys):
    assert main(["finetune", str(tmp_path), "--data", str(instruction_file), "--out", str(tmp_path / "o")]) == 2
    assert "not a Kiln checkpoint" in capsys.readouterr().err
