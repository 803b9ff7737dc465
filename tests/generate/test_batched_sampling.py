"""Several continuations of one prompt decoded as one batch are the continuations decoded one at a time:
greedy, seeded sampling, stops, the context window, and `kiln sample --num-samples`."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.checkpoint import save_checkpoint
from kiln.cli import main
from kiln.data.tokenizers.char import CharTokenizer
from kiln.generate.sampling import SamplingConfig, generate, generate_rows, sample_texts, stream_text
from kiln.model import packed
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.packed import pack_for_decoding


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_style=request.param)
    return GPT(GPTConfig(vocab_size=61, block_size=24, **shape)).eval()


def seeded(config: SamplingConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(**{**config.__dict__, "seed": seed})


def columns(rows) -> list[list[int | None]]:
    return [list(row) for row in zip(*rows, strict=True)]


def test_greedy_rows_equal_one_run_each(model):
    prompt = torch.randint(0, 61, (1, 5))
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    alone = list(generate(model, prompt, config))
    assert columns(generate_rows(model, prompt, config, [None] * 4)) == [alone] * 4


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)])
def test_seeded_rows_equal_one_seeded_run_each(model, settings):
    prompt = torch.randint(0, 61, (1, 4))
    config = SamplingConfig(max_new_tokens=15, repetition_penalty=1.1, **settings)
    seeds = [7, 8, 9, 10, 11]
    alone = [list(generate(model, prompt, seeded(config, s))) for s in seeds]
    batch = columns(generate_rows(model, prompt, config, seeds))
    assert batch == alone
    assert len({tuple(row) for row in batch}) > 1  # the seeds made different texts


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_rows_of_a_packed_model_equal_its_runs(model, precision):
    if precision == "fp16" and not packed.fbgemm_available("cpu"):
        pytest.skip("fp16 weights need fbgemm (x86)")
    fast = pack_for_decoding(copy.deepcopy(model), precision, rows=3)
    prompt = torch.randint(0, 61, (1, 4))
    config = SamplingConfig(max_new_tokens=15, temperature=0.9)
    alone = [list(generate(fast, prompt, seeded(config, s))) for s in (4, 5, 6)]
    assert columns(generate_rows(fast, prompt, config, [4, 5, 6])) == alone


def test_rows_go_on_past_the_context_window_as_one_run_does(model):
    prompt = torch.randint(0, 61, (1, 6))
    config = SamplingConfig(max_new_tokens=50, temperature=1.0)  # two rebuilds of a 24-token window
    alone = [list(generate(model, prompt, seeded(config, s))) for s in (1, 2, 3)]
    assert columns(generate_rows(model, prompt, config, [1, 2, 3])) == alone


def test_a_row_that_meets_a_stop_id_yields_none_and_the_others_go_on(model):
    prompt = torch.randint(0, 61, (1, 4))
    config = SamplingConfig(max_new_tokens=10, temperature=1.0)
    free = columns(generate_rows(model, prompt, config, [1, 2]))
    stop = free[0][2]
    assert stop not in free[1]  # this seed's text happens not to hold row 0's third token
    stopped = columns(generate_rows(model, prompt, config, [1, 2], stop_ids={stop}))
    cut = free[0].index(stop) + 1
    assert stopped[0] == free[0][:cut] + [None] * (10 - cut) and stopped[1] == free[1]
    assert list(generate_rows(model, prompt, config, [1], stop_ids={stop}))[-1] == [stop]  # all stopped: ends


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    text = "the cat sat on the mat.\nthe dog sat on the log.\n"
    tokenizer = CharTokenizer(text, specials=["<|endoftext|>"])
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    folder = tmp_path_factory.mktemp("char") / "best"
    save_checkpoint(folder, model, tokenizer)
    return folder, model.eval(), tokenizer


def test_sample_texts_equal_stream_text_with_each_seed_and_stop(char_checkpoint):
    _, model, tokenizer = char_checkpoint
    config = SamplingConfig(max_new_tokens=40, temperature=1.2)
    seeds, stop = [3, 4, 5, 6], ["t"]
    alone = ["".join(stream_text(model, tokenizer, "the ", seeded(config, s), stop)) for s in seeds]
    assert sample_texts(model, tokenizer, "the ", config, seeds, stop) == alone
    assert any(len(text) < 40 for text in alone)  # some stopped early, some later


def test_kiln_sample_num_samples_prints_what_one_seeded_run_each_prints(char_checkpoint, capsys):
    folder = str(char_checkpoint[0])
    argv = ["sample", folder, "--prompt", "the ", "--max-new-tokens", "30", "--temperature", "1.0"]
    assert main([*argv, "--num-samples", "3", "--seed", "10"]) == 0
    batch = capsys.readouterr().out
    alone = ""
    for number in range(3):
        assert main([*argv, "--seed", str(10 + number)]) == 0
        alone += f"--- sample {number + 1}\n" + capsys.readouterr().out
    assert batch == alone
    assert main([*argv, "--num-samples", "2", "--seed", "10", "--precision", "bf16"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
