"""Word-swapped copies of instruction examples: the words a question and its answer share are swapped,
the same way in both, and only training examples are copied."""

from __future__ import annotations

import pytest

from kiln.checkpoint import load_checkpoint
from kiln.cli import main
from kiln.data.instructions import Conversation, Message, load_instructions
from kiln.data.templates import get_template
from kiln.data.tokenizers import EOS, BPETokenizer, CharTokenizer
from kiln.errors import ConfigError
from kiln.finetune.augment import SwappedCopy, shared_words, with_swapped_words
from kiln.finetune.examples import encode_conversations
from kiln.finetune.sft import finetune_settings
from kiln.model.gpt import IGNORE


def example(question: str, answer: str, context: str = "") -> Conversation:
    return Conversation([Message("user", question, context), Message("assistant", answer)], "test")


CAPITAL = example("What is the capital of Sweden?", "The capital of Sweden is Stockholm.")
TENSE = example("What is the past tense of 'fly'?", "The past tense of 'fly' is 'flew'.")
SORT = example("Sort these words.", "Apple, Zebra", context="zebra, apple")
NOTHING = example("Name a colour.", "Red.")


def test_shared_words_are_the_content_words_of_both_the_prompt_and_the_answer():
    assert shared_words(CAPITAL) == {"capital", "sweden"}
    assert shared_words(TENSE) == {"past", "tense", "fly"}
    assert shared_words(SORT) == {"zebra", "apple"}  # the input counts as part of the prompt
    assert shared_words(NOTHING) == set()


def test_each_copy_swaps_a_word_alike_in_question_and_answer_keeping_its_case():
    train = [CAPITAL, TENSE, SORT, NOTHING]
    mixed = with_swapped_words(train, copies=3, seed=1)
    assert len(mixed) == 4 + 3 * 3  # no copy of an example with no shared words
    assert all(example in mixed for example in train)
    pool = {"capital", "sweden", "past", "tense", "fly", "zebra", "apple"}
    capitals = [c for c in mixed if c.response.endswith(" is Stockholm.")]
    tenses = [c for c in mixed if c.messages[0].content.endswith("'?")]
    sorts = [c for c in mixed if c.messages[0].context]
    assert len(capitals) == len(tenses) == len(sorts) == 4  # each example and its 3 copies
    for copy in capitals:
        *_, kind, _, city = copy.messages[0].content.removesuffix("?").split()
        assert {kind, city.lower()} <= pool and kind.islower() and city[0].isupper()  # the case kept
        assert copy.response == f"The {kind} of {city} is Stockholm."  # swapped alike in the answer
    for copy in tenses:
        word = copy.messages[0].content.split("'")[1]
        assert word in pool and f"of '{word}' is 'flew'." in copy.response
    for copy in sorts:
        first, second = copy.messages[0].context.split(", ")
        assert {first, second} <= pool and copy.response == f"{second.capitalize()}, {first.capitalize()}"
    assert len({c.messages[0].content for c in capitals}) > 1  # the words do change
    assert with_swapped_words(train, copies=3, seed=1) == mixed  # the same for the same seed
    assert with_swapped_words(train, copies=0) == train


def test_original_copies_repeat_each_training_example_beside_its_swapped_copies():
    train = [CAPITAL, TENSE, SORT, NOTHING]
    mixed = with_swapped_words(train, copies=3, seed=1, originals=2)
    assert len(mixed) == 2 * 4 + 3 * 3
    assert all(sum(c is example for c in mixed) == 2 for example in train)
    once = with_swapped_words(train, copies=3, seed=1)

    def copies(mix):
        return sorted(repr(c) for c in mix if not any(c is example for example in train))

    assert len(copies(mixed)) == 9 and copies(mixed) == copies(once)  # the same copies
    alone = with_swapped_words(train, copies=0, seed=1, originals=3)
    assert sorted(map(repr, alone)) == sorted(map(repr, train * 3))


def answer_losses(conversation, tokenizer) -> list[tuple[str, bool]]:
    """Each answer token's text and whether it carries loss, as fine-tuning encodes `conversation`."""
    (example,), _ = encode_conversations([conversation], get_template("alpaca"), tokenizer, 256)
    targets = [*example.inputs[1:], example.labels[-1]]  # the token each position predicts (the last: EOS)
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE)  # the answer's first token
    return [(tokenizer.decode([targets[i]]), example.labels[i] != IGNORE) for i in range(start, len(targets))]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_copy_carries_loss_only_on_the_answer_words_its_question_has(kind):
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!:'#\n"
    texts = ["What is the capital of Lion? The capital of Lion is Stockholm, 1,234 km away."] * 50
    tokenizer = (
        CharTokenizer(letters, specials=[EOS]) if kind == "char" else BPETokenizer.train(texts, 300)
    ).with_added(specials=[EOS])
    question, answer = "What is the capital of Lion?", "The capital of Lion is Stockholm, 1,234 km away."
    original = example(question, answer)
    copy = SwappedCopy(original.messages, "test")
    learnt = "".join(text if loss else "_" * len(text) for text, loss in answer_losses(copy, tokenizer))
    # Stockholm, the numbers and "km away" are not in the question: no loss on them. The question's words,
    # the spaces and punctuation around them, and the answer's end (EOS) keep theirs.
    assert learnt.startswith("The capital of Lion is") and "Stockholm" not in learnt and "234" not in learnt
    assert learnt.endswith("." + tokenizer.decode([tokenizer.eos_id])) and "km" not in learnt and "away" not in learnt
    whole = "".join(text for text, loss in answer_losses(original, tokenizer) if loss)
    assert whole == answer + tokenizer.decode([tokenizer.eos_id])  # an original keeps loss on all of it


def test_word_swap_counts_below_their_minimum_are_config_errors():
    for key, value in (("original_copies", 0), ("word_swaps", -1)):
        with pytest.raises(ConfigError, match=f"{key}={value}"):
            finetune_settings({key: value})


def test_finetune_copies_the_training_examples_only(tmp_path, base_checkpoint, instruction_file, capsys):
    splits = load_instructions(instruction_file).split()
    sharing = sum(bool(shared_words(c)) for c in splits["train"])  # "Repeat the word." apple -> apple, ...
    assert 0 < sharing < len(splits["train"])  # "Spell the word backwards." shares none
    out = tmp_path / "run"
    args = ["finetune", str(base_checkpoint), "--data", str(instruction_file), "--out", str(out)]
    assert main([*args, "--max-iters", "2", "--set", "block_size=128", "--set", "word_swaps=2"]) == 0
    printed = capsys.readouterr().out
    train, val, test = (len(splits[name]) for name in ("train", "val", "test"))
    assert f"train {train + 2 * sharing}, val {val}, test {test};" in printed
    assert f"train holds {2 * sharing} word-swapped copies" in printed
    more = ["--set", "original_copies=3", "--out", str(tmp_path / "again")]
    assert main([*args, "--max-iters", "2", "--set", "block_size=128", "--set", "word_swaps=2", *more]) == 0
    printed = capsys.readouterr().out
    assert f"train {3 * train + 2 * sharing}, val {val}, test {test};" in printed
    assert f"train holds 3 of each original example and {2 * sharing} word-swapped copies" in printed
    assert load_checkpoint(out / "best").info["template"] == "alpaca"
