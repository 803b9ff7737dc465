"""LoRA through peft: only adapters train, merging changes nothing, adapters know their base."""

from __future__ import annotations

import pytest
import torch

from kiln.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from kiln.cli import main
from kiln.data.tokenizers import EOS, CharTokenizer
from kiln.errors import ConfigError
from kiln.model.gpt import GPT, GPTConfig
from kiln.model.lora import LoraSettings, add_lora, count_parameters, merge_lora


def small_model(**changes) -> GPT:
    torch.manual_seed(0)
    settings = dict(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, block_style="llama") | changes
    return GPT(GPTConfig(**settings))


def train_a_little(model, steps=5, vocab=40):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, vocab, (4, 16), generator=generator)
        _, loss = model(x, targets=x.roll(-1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_r8_on_attention_of_a_distilgpt2_sized_model_trains_0_18_percent():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=12, n_embd=768))
        trainable, total = count_parameters(add_lora(model, LoraSettings(r=8, alpha=16, dropout=0.05)))
    assert trainable == 147_456  # 6 layers x (768 x 8 + 8 x 2304)
    assert 81e6 < total < 83e6 and round(100 * trainable / total, 2) == 0.18


@pytest.mark.parametrize("block_style", ["gpt2", "llama"])
@pytest.mark.parametrize("targets", ["attn", "all"])
def test_only_adapter_weights_train_and_the_merge_keeps_the_logits(block_style, targets):
    model = small_model(block_style=block_style)
    model.resize_vocab(44)  # four new tokens, trained as peft's trainable rows
    # peft wraps the base layers without copying them, so the same tensors can be checked afterwards.
    base = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in base.items()}
    wrapped = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, targets=targets), new_token_ids=[40, 41, 42, 43])
    assert not any(p.requires_grad for p in base.values())
    train_a_little(wrapped, vocab=44)
    for name, param in base.items():
        assert torch.equal(param, before[name]), f"base weight {name} changed"

    x = torch.randint(0, 44, (2, 20), generator=torch.Generator().manual_seed(2))
    wrapped.eval()
    with torch.no_grad():
        adapted = wrapped(x)[0]
        merged = merge_lora(wrapped)
        assert isinstance(merged, GPT)
        assert not torch.equal(merged.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)
        if merged.config.tie_word_embeddings:
            assert merged.lm_head.weight is merged.wte.weight


def test_a_new_token_is_learned_in_and_out_on_an_untied_head(tmp_path):
    """A template's EOS new to the vocabulary must be writable as well as readable: on an untied head its
    output row trains too (else the model can never learn to stop); no other row of either moves."""
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,?!", specials=[])  # one document: no EOS
    base = save_checkpoint(tmp_path / "base", small_model(vocab_size=32, tie_word_embeddings=False), tokenizer)
    grown = tokenizer.with_added(specials=[EOS])
    eos = grown.eos_id
    model = load_checkpoint(base).model
    model.resize_vocab(grown.vocab_size)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped = add_lora(model, LoraSettings(r=2, dropout=0.0), new_token_ids=[eos])
    x = torch.randint(0, eos, (4, 16), generator=torch.Generator().manual_seed(1))
    x[:, 3::4] = eos  # short "answers", each ending in the new EOS
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        _, loss = wrapped(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = save_adapter(tmp_path / "adapter", wrapped, base, grown)
    merged = load_checkpoint(adapter).model
    for name in ("wte.weight", "lm_head.weight"):
        moved = (merged.state_dict()[name] != before[name]).any(dim=1)
        assert moved.nonzero().flatten().tolist() == [eos], f"{name}: rows {moved.nonzero().flatten().tolist()} moved"


def test_an_adapter_folder_loads_onto_its_base_and_refuses_another(tmp_path):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,?!:\n'ABCDEFGHIJKLM", specials=[EOS])
    base = save_checkpoint(tmp_path / "base", small_model(vocab_size=tokenizer.vocab_size), tokenizer)
    wrapped = add_lora(load_checkpoint(base).model, LoraSettings(r=2, dropout=0.0))
    train_a_little(wrapped, vocab=tokenizer.vocab_size)
    adapter = save_adapter(tmp_path / "adapter", wrapped, base, tokenizer, {"template": "chat"})
    assert (adapter / "adapter_model.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size

    x = torch.randint(0, tokenizer.vocab_size, (1, 12))
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(x)[0]
        loaded = load_checkpoint(adapter)
        torch.testing.assert_close(loaded.model(x)[0], expected, atol=1e-5, rtol=0)
    assert loaded.info["template"] == "chat"

    # `kiln merge` writes a plain checkpoint that computes the same
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "merged").model(x)[0], expected, atol=1e-5, rtol=0)

    torch.manual_seed(5)  # same shape, other weights
    other = save_checkpoint(tmp_path / "other", GPT(GPTConfig(**load_checkpoint(base).info["model"])), tokenizer)
    with pytest.raises(ConfigError, match="trained on other weights"):
        load_checkpoint(adapter, base=other)


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, base_checkpoint, capsys):
    assert main(["merge", str(base_checkpoint), "--out", str(tmp_path / "m")]) == 2
    assert "not a Kiln LoRA adapter" in capsys.readouterr().err
