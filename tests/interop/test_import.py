"""`kiln import` and `--init-from`: GPT-2-family and Llama checkpoints become Kiln checkpoints that compute
what transformers computes, and go on training and fine-tuning through Kiln's own commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hf_compare import max_logit_gap

from kiln.checkpoint import is_adapter, load_checkpoint

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def save_with_gpt2_tokenizer(model, folder, mirror) -> None:
    """What `save_pretrained` leaves for a GPT-2-family model: weights, config and GPT-2's tokenizer."""
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(mirror / "tiny-gpt2" / name, folder / name)


def test_import_the_real_tiny_gpt2(kiln_cli, tmp_path, mirror, verdict_text):
    code, out, err = kiln_cli("import", str(mirror / "tiny-gpt2"), str(tmp_path / "kiln"))
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "kiln")
    config = checkpoint.model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (2, 2, 2, 1024)
    assert config.activation == "gelu_tanh" and config.tie_word_embeddings
    assert checkpoint.tokenizer.kind == "gpt2"
    assert checkpoint.tokenizer.encode(verdict_text) == checkpoint.tokenizer.encode(verdict_text)  # loads and runs
    assert len(checkpoint.tokenizer.encode(verdict_text)) == 5145
    ids = torch.tensor([checkpoint.tokenizer.encode(verdict_text)[:1024]])
    assert max_logit_gap(checkpoint.model, hf_model(mirror / "tiny-gpt2"), ids) < 1e-4


def test_distilgpt2_shape_imports_fine_tunes_with_lora_and_exports(kiln_cli, tmp_path, mirror, verdict_text):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    distil = GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257))
    save_with_gpt2_tokenizer(distil, tmp_path / "distilgpt2", mirror)

    code, _, err = kiln_cli("import", str(tmp_path / "distilgpt2"), str(tmp_path / "imported"))
    assert code == 0, err
    imported = load_checkpoint(tmp_path / "imported")
    ids = torch.tensor([imported.tokenizer.encode(verdict_text)[:256]])
    assert max_logit_gap(imported.model, distil, ids) < 1e-4

    records = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}."} for a in range(4) for b in range(5)]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = kiln_cli(
        "finetune", "--init-from", str(tmp_path / "distilgpt2"), "--data", str(qa), "--out", str(tmp_path / "ft"),
        "--lora-r", "8", "--max-iters", "2", "--set", "block_size=64", "--set", "batch_size=4",
    )  # fmt: skip
    assert code == 0, err
    assert "LoRA r=8 alpha=16 on attn" in out and is_adapter(tmp_path / "ft" / "best")

    code, _, err = kiln_cli("export", str(tmp_path / "ft" / "best"), "--to", "hf", str(tmp_path / "hf"))
    assert code == 0, err
    merged = load_checkpoint(tmp_path / "ft" / "best")
    assert max_logit_gap(merged.model, hf_model(tmp_path / "hf"), ids[:, :64]) < 1e-4
    assert max_logit_gap(merged.model, distil, ids[:, :64]) > 1e-6  # the adapter changed the weights


def test_llama_with_grouped_query_attention_imports(kiln_cli, tmp_path, mirror, verdict_text):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
        bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    llama = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in llama.parameters():  # norms away from 1, so a misplaced one shows
            parameter.normal_(0.0, 0.3)
    save_with_gpt2_tokenizer(llama, tmp_path / "llama", mirror)
    code, _, err = kiln_cli("import", str(tmp_path / "llama"), str(tmp_path / "kiln"))
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "kiln")
    assert checkpoint.model.config.kv_heads == 2 and checkpoint.model.config.rope_theta == 5000.0
    ids = torch.tensor([checkpoint.tokenizer.encode(verdict_text)[:128]])
    assert max_logit_gap(checkpoint.model, llama, ids) < 1e-4


def test_a_model_kiln_cannot_hold_is_refused_in_one_line(kiln_cli, tmp_path, mirror):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, activation_function="relu"))
    save_with_gpt2_tokenizer(model, tmp_path / "relu", mirror)
    code, _, err = kiln_cli("import", str(tmp_path / "relu"), str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "activation_function 'relu'" in err
    code, _, err = kiln_cli("import", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "not a Hugging Face model folder (no config.json)" in err


def test_a_hub_id_offline_names_the_local_folder_to_use(kiln_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = kiln_cli("import", "distilgpt2", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert "distilbert/distilgpt2" in err and "--local-dir distilgpt2" in err and "give its path" in err


def test_train_init_from_goes_on_pretraining_gpt2_weights(kiln_cli, tmp_path, mirror):
    lines = tmp_path / "examples.txt"
    lines.write_text("".join(f"Example number {n} says hello.\n\n" for n in range(200)))
    code, out, err = kiln_cli(
        "train", "--init-from", str(mirror / "tiny-gpt2"), "--data", str(lines), "--one-per-line",
        "--out", str(tmp_path / "run"), "--max-iters", "3", "--set", "block_size=32", "--set", "batch_size=2",
        "--set", "eval_batches=1",
    )  # fmt: skip
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "run" / "best")
    assert checkpoint.info["init_from"] == str(mirror / "tiny-gpt2")
    assert checkpoint.model.config.block_size == 32 and checkpoint.model.config.n_embd == 2
    start = hf_model(mirror / "tiny-gpt2")
    moved = (checkpoint.model.wte.weight - start.transformer.wte.weight).abs().max().item()
    assert 0 < moved < 0.1  # trained from the imported weights, not from a fresh init
    splits = json.loads((Path(checkpoint.info["data"]) / "meta.json").read_text())["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] in (200, 201)  # one per line

    code, _, err = kiln_cli(
        "train", "--init-from", str(mirror / "tiny-gpt2"), "--data", str(lines), "--out", str(tmp_path / "r2"),
        "--max-iters", "1", "--set", "n_layer=4",
    )  # fmt: skip
    assert code == 2 and "--init-from fixes the model's shape (n_layer 2)" in err
