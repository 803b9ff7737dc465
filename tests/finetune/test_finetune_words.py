"""Fine-tuning adds the words of its training examples to the words the model has read, and no word of
the examples it holds out."""

from __future__ import annotations

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.cli import main
from kiln.data.instructions import load_instructions
from kiln.data.words import WORDS_FILE, words_of


def test_the_tuned_model_knows_the_training_examples_words(tmp_path, base_checkpoint, instruction_file):
    base = load_checkpoint(base_checkpoint)
    base.tokenizer.words = {"pretrained": 5}
    counted = save_checkpoint(tmp_path / "counted", base.model, base.tokenizer)
    splits = load_instructions(instruction_file).split()
    train = {w for c in splits["train"] for m in c.messages for w in words_of(f"{m.content} {m.context}")}
    held_out = {w for name in ("val", "test") for c in splits[name] for m in c.messages for w in words_of(m.content)}
    only_held_out = held_out - train
    assert only_held_out  # each example has a word of its own (tests/finetune/conftest.py)

    args = ["--data", str(instruction_file), "--max-iters", "1", "--set", "block_size=128"]
    assert main(["finetune", str(counted), "--out", str(tmp_path / "run"), *args]) == 0
    words = load_checkpoint(tmp_path / "run" / "best").tokenizer.words
    assert words["pretrained"] == 5 and train <= set(words)
    assert not only_held_out & set(words)

    # a model that came without a count (made elsewhere) is not given one of its examples alone
    assert main(["finetune", str(base_checkpoint), "--out", str(tmp_path / "bare"), *args]) == 0
    assert not (tmp_path / "bare" / "best" / "tokenizer" / WORDS_FILE).exists()
