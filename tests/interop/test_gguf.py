"""`kiln export --to gguf`: a llama-style model as one GGUF file that transformers' GGUF reader (the same
layout llama.cpp reads) turns back into the same model and tokenizer."""

from __future__ import annotations

import pytest
import torch
from hf_compare import max_logit_gap

from kiln.checkpoint import save_checkpoint
from kiln.model.gpt import GPT, GPTConfig

gguf = pytest.importorskip("gguf")
# GGUF name -> transformers name, for the tensors that are only renamed on the way.
RENAMED_ONLY = {
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def random_llama(vocab_size: int, **extra) -> GPT:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32, block_style="llama", **extra)
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("extra", [dict(bias=False, n_kv_head=2), dict(bias=False, tie_word_embeddings=False)])
def test_gguf_export_loads_back_with_the_same_logits_and_tokens(kiln_cli, tmp_path, gpt2, verdict_text, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = random_llama(gpt2.vocab_size, **extra)
    save_checkpoint(tmp_path / "ckpt", model, gpt2)
    code, out, err = kiln_cli("export", str(tmp_path / "ckpt"), "--to", "gguf", str(tmp_path / "model.gguf"))
    assert code == 0, err
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    ids = torch.tensor([gpt2.encode(verdict_text)[:64]])
    assert max_logit_gap(model, hf_model, ids) < 1e-4
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert hf_tokenizer(verdict_text, add_special_tokens=False)["input_ids"] == gpt2.encode(verdict_text)


def test_gguf_biases_and_rope_rows_are_written_as_llama_cpp_reads_them(tmp_path, trained_bpe):
    """llama.cpp's llama reads optional q/k/v/o and MLP biases (transformers' GGUF reader skips them), so
    they are checked here by reading the file back and undoing llama.cpp's RoPE row order by hand."""
    from kiln.interop.gguf_export import export_gguf
    from kiln.interop.layouts import to_hf_state_dict

    model = random_llama(trained_bpe.vocab_size, bias=True, n_kv_head=2)
    save_checkpoint(tmp_path / "ckpt", model, trained_bpe)
    export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    tensors = {
        t.name: torch.from_numpy(t.data.copy()).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    expected = to_hf_state_dict(model)

    def unpair(rows: torch.Tensor, heads: int) -> torch.Tensor:  # [x0, y0, x1, y1, ...] -> [x..., y...] per head
        return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)

    for layer in range(2):
        hf, gg = f"model.layers.{layer}.", f"blk.{layer}."
        for kind, heads in (("q", 4), ("k", 2)):
            for part in ("weight", "bias"):
                got = unpair(tensors[f"{gg}attn_{kind}.{part}"], heads)
                assert torch.equal(got, expected[f"{hf}self_attn.{kind}_proj.{part}"])
        for ours, theirs in RENAMED_ONLY.items():
            for part in ("weight", "bias"):
                assert torch.equal(tensors[f"{gg}{ours}.{part}"], expected[f"{hf}{theirs}.{part}"])
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    fields = reader.fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2


def test_gguf_refuses_what_llama_cpp_cannot_run(kiln_cli, tmp_path, verdict_text, gpt2):
    from kiln.data.tokenizers import EOS, CharTokenizer

    char = CharTokenizer(verdict_text, specials=[EOS])
    save_checkpoint(tmp_path / "char", random_llama(char.vocab_size), char)
    code, _, err = kiln_cli("export", str(tmp_path / "char"), "--to", "gguf", str(tmp_path / "a.gguf"))
    assert code == 2 and "has a char tokenizer" in err and "--to hf" in err
    config = GPTConfig(vocab_size=gpt2.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "gpt2", GPT(config), gpt2)
    code, _, err = kiln_cli("export", str(tmp_path / "gpt2"), "--to", "gguf", str(tmp_path / "b.gguf"))
    assert code == 2 and "GGUF export is for llama-style models" in err
