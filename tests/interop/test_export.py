"""`kiln export --to hf`: every block style with every tokenizer loads in transformers with no custom
code and computes what Kiln computes: logits within 1e-4, the same 50 greedy tokens, the same token ids."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hf_compare import greedy_ids, max_logit_gap

from kiln.checkpoint import save_checkpoint
from kiln.data.instructions import Message
from kiln.data.templates import encode_pieces, get_template
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.model.gpt import GPT, GPTConfig

# Each case varies what the mapping must get right: activation, biases (GPT-2 always has them, so a
# bias-free Kiln model exports zeros), grouped-query attention, a tied or separate output head.
CASES = {
    "gpt2-char": ("gpt2", "char", dict(activation="gelu")),
    "gpt2-bpe": ("gpt2", "bpe", dict(activation="gelu_tanh", bias=False, tie_word_embeddings=False)),
    "gpt2-gpt2": ("gpt2", "gpt2", dict(activation="gelu_tanh")),
    "llama-char": ("llama", "char", dict(n_kv_head=2, bias=False, tie_word_embeddings=False)),
    "llama-bpe": ("llama", "bpe", dict(bias=True, rope_theta=500.0)),
    "llama-gpt2": ("llama", "gpt2", dict(n_kv_head=1, bias=False)),
}
GPT2_LAYOUT = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


def random_model(config: GPTConfig) -> GPT:
    """Weights far from their init (biases and norms included), so a misplaced tensor shows."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizers(verdict_text, gpt2, trained_bpe):
    return {"char": CharTokenizer(verdict_text, specials=[EOS]), "bpe": trained_bpe, "gpt2": gpt2}


@pytest.fixture(scope="module")
def exported(tokenizers, tmp_path_factory):
    """name -> (Kiln model, Kiln tokenizer, export folder), each written by `kiln export`."""
    from kiln.cli import main

    made = {}
    for name, (style, kind, extra) in CASES.items():
        tokenizer = tokenizers[kind]
        config = GPTConfig(
            vocab_size=tokenizer.vocab_size, block_size=96, n_layer=2, n_head=4, n_embd=32, block_style=style, **extra
        )
        model = random_model(config)
        folder = tmp_path_factory.mktemp(name)
        save_checkpoint(folder / "ckpt", model, tokenizer)
        assert main(["export", str(folder / "ckpt"), "--to", "hf", str(folder / "hf")]) == 0
        made[name] = (model, tokenizer, folder / "hf")
    return made


def load_hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", CASES)
def test_export_writes_save_pretrained_layout(exported, name):
    _, tokenizer, folder = exported[name]
    style, kind, _ = CASES[name]
    expected = GPT2_LAYOUT | ({"vocab.json", "merges.txt"} if kind != "char" else set())
    assert {p.name for p in folder.iterdir()} == expected
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[style]]
    assert config["eos_token_id"] == tokenizer.eos_id
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special["eos_token"] == EOS


@pytest.mark.parametrize("name", CASES)
def test_exported_logits_match_within_1e_4(exported, name, verdict_text):
    model, tokenizer, folder = exported[name]
    hf_model, _ = load_hf(folder)
    torch.manual_seed(1)
    random_ids = torch.randint(0, tokenizer.vocab_size, (2, 96))
    real_ids = torch.tensor([tokenizer.encode(verdict_text[:2000])[:96]])
    assert max_logit_gap(model, hf_model, random_ids) < 1e-4
    assert max_logit_gap(model, hf_model, real_ids) < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_exported_model_generates_the_same_50_greedy_tokens(exported, name):
    model, tokenizer, folder = exported[name]
    hf_model, _ = load_hf(folder)
    ours, theirs = greedy_ids(model, hf_model, tokenizer.encode("It had always been"), steps=50)
    assert len(ours) == 50 and ours == theirs


@pytest.mark.parametrize("name", ["gpt2-char", "gpt2-bpe", "gpt2-gpt2"])
def test_exported_tokenizer_encodes_the_verdict_as_kiln_does(exported, name, verdict_text):
    _, tokenizer, folder = exported[name]
    _, hf_tokenizer = load_hf(folder)
    text = verdict_text + EOS + "tail"  # special-token text becomes the special token on both sides
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(verdict_text)) == verdict_text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_char_tokenizer_with_unk_and_added_tokens_exports_exactly(tmp_path, verdict_text):
    from transformers import AutoTokenizer

    from kiln.interop.tokenizer_files import save_hf_tokenizer

    # Built with <unk>, then grown by fine-tuning (a character and a special token after the specials).
    tokenizer = CharTokenizer(verdict_text[:5000], specials=[EOS], unk=True).with_added(
        chars="#", specials=["<|user|>"]
    )
    save_hf_tokenizer(tokenizer, tmp_path, max_length=64)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "Unseen: é ñ # <unk> and <|user|> then " + EOS + verdict_text[5000:6000]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)


@pytest.mark.parametrize("template_name", ["chat", "alpaca"])
def test_fine_tuned_export_carries_its_chat_template(tmp_path, tokenizers, template_name):
    from transformers import AutoTokenizer

    from kiln.interop.hf import export_hf

    template = get_template(template_name)
    tokenizer = tokenizers["gpt2"].with_added(specials=template.special_tokens)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "ckpt", GPT(config), tokenizer, info={"template": template_name})
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert "chat_template" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [
        Message("system", "Answer briefly."),
        Message("user", "Name a colour.", context="of the sky"),
        Message("assistant", "Blue."),
        Message("user", "And grass?"),
    ]
    as_dicts = [
        {"role": m.role, "content": m.content} | ({"context": m.context} if m.context else {}) for m in conversation
    ]
    theirs = hf_tokenizer.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # a BatchEncoding in transformers 5
    ours = encode_pieces(template.render(conversation, generation_prompt=True), tokenizer).ids
    assert list(theirs) == ours


def test_export_of_a_folder_that_is_not_a_checkpoint_is_one_line(kiln_cli, tmp_path):
    code, _, err = kiln_cli("export", str(tmp_path), "--to", "hf", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "not a Kiln checkpoint" in err


def test_smallest_gpt2_trained_for_5_epochs_exports_and_generates_in_transformers(kiln_cli, tmp_path, verdict_text):
    """LLMs-from-scratch's hand-trained GPT-2 (2 layers, 2 heads, 128 wide, GPT-2 tokenizer), through the CLI."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(verdict_text[:6000])
    code, out, err = kiln_cli(
        "train", "--data", str(corpus), "--tokenizer", "gpt2", "--preset", "tiny", "--epochs", "5",
        "--set", "block_size=128", "--set", "batch_size=2", "--set", "eval_batches=2", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, err
    assert "2 layers, 2 heads, 128 wide" in out
    train_tokens = int(re.search(r"train ([\d,]+) tokens", out).group(1).replace(",", ""))
    steps = int(re.search(r"done: ([\d,]+) steps", out).group(1).replace(",", ""))
    windows = len(range(0, train_tokens - 128, 128))  # non-overlapping, each with its next-token target
    assert steps == 5 * (windows // 2)  # every epoch all whole batches of them (drop_last)
    code, _, err = kiln_cli("export", str(tmp_path / "run" / "best"), "--to", "hf", str(tmp_path / "hf"))
    assert code == 0, err
    assert {p.name for p in (tmp_path / "hf").iterdir()} == GPT2_LAYOUT | {"vocab.json", "merges.txt"}

    hf_model, hf_tokenizer = load_hf(tmp_path / "hf")
    prompt = "I had always thought Jack Gisburn"
    ids = hf_tokenizer(prompt, return_tensors="pt")
    generated = hf_model.generate(**ids, max_new_tokens=50, do_sample=False)[0, ids["input_ids"].shape[1] :]
    code, out, err = kiln_cli(
        "sample", str(tmp_path / "run" / "best"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "50"
    )
    assert code == 0, err
    assert out.removesuffix("\n") == prompt + hf_tokenizer.decode(generated)  # the text may end in line breaks


def test_export_and_import_never_replace_a_folder_that_holds_something_unless_forced(kiln_cli, tmp_path, mirror):
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("my own work")
    code, _, err = kiln_cli("import", str(mirror / "tiny-gpt2"), str(kept))
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert (kept / "notes.txt").read_text() == "my own work"
    assert kiln_cli("import", str(mirror / "tiny-gpt2"), str(tmp_path / "ckpt"))[0] == 0
    code, _, err = kiln_cli("export", str(tmp_path / "ckpt"), "--to", "hf", str(kept))
    assert code == 2 and "already exists" in err and (kept / "notes.txt").exists()
    assert kiln_cli("export", str(tmp_path / "ckpt"), "--to", "hf", str(kept), "--force")[0] == 0
    assert (kept / "config.json").is_file() and not (kept / "notes.txt").exists()
