"""`kiln export --to gguf`: a `llama`-style model with a byte-level BPE tokenizer as one GGUF file,
the format llama.cpp runs, written with the `gguf` package.

llama.cpp's llama architecture rotates interleaved pairs of query/key dimensions, where Kiln (like
transformers) rotates the first half against the second; so query and key rows are reordered within
each head, as llama.cpp's own converter does. Everything else is a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from kiln.atomic import atomic_file, refuse_to_replace
from kiln.checkpoint import load_checkpoint
from kiln.data.tokenizers import CharTokenizer, Tokenizer
from kiln.data.tokenizers.bpe import PAD
from kiln.errors import KilnError
from kiln.interop.layouts import refuse_smeared_keys, to_hf_state_dict
from kiln.interop.tokenizer_files import hf_backend
from kiln.model.gpt import GPT


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [x0..x(d/2-1), y0..y(d/2-1)] of each head -> [x0, y0, x1, y1, ...] (llama.cpp's RoPE pairs)."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _check_exportable(model: GPT, tokenizer: Tokenizer | None, source: str) -> None:
    refuse_smeared_keys(model.config)
    if model.config.block_style != "llama":
        raise KilnError(f"{source}: GGUF export is for llama-style models; use --to hf for gpt2-style ones")
    if tokenizer is None:
        raise KilnError(f"{source}: has no tokenizer/ folder; an export needs the tokenizer the model reads")
    if isinstance(tokenizer, CharTokenizer):
        raise KilnError(
            f"{source}: has a {tokenizer.kind} tokenizer; llama.cpp reads byte-level BPE vocabularies (gpt2, bpe), so "
            "export this one with --to hf"
        )


def _bpe_merges(backend) -> list[str]:
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers writes either form


def export_gguf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Write `checkpoint` (or an adapter merged onto its base) as one fp32 GGUF file."""
    refuse_to_replace(Path(out), force)
    try:
        import gguf
    except ImportError:
        raise KilnError("--to gguf needs the gguf package: pip install gguf") from None
    loaded = load_checkpoint(checkpoint, base=base)
    model, tokenizer, config = loaded.model.float().eval(), loaded.tokenizer, loaded.model.config
    _check_exportable(model, tokenizer, str(checkpoint))
    out = Path(out)
    # closing() also on failure: a disk that fills mid-write must not keep the file open.
    with atomic_file(out) as tmp, contextlib.closing(gguf.GGUFWriter(str(tmp), "llama")) as writer:
        writer.add_name(Path(checkpoint).resolve().parent.name or "kiln")
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.hidden)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.kv_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_tokenizer(writer, tokenizer, config.vocab_size, loaded.info.get("template"), gguf)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
        for hf_name, tensor in to_hf_state_dict(model).items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp uses the token embedding as the output head when there is none
            if ".q_proj." in hf_name:
                tensor = _interleave_rope_rows(tensor, config.n_head)
            elif ".k_proj." in hf_name:
                tensor = _interleave_rope_rows(tensor, config.kv_heads)
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            writer.add_tensor(name, tensor.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out


def _add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int, template: str | None, gguf) -> None:
    from kiln.data.templates import get_template

    backend = hf_backend(tokenizer)
    by_id = {i: token for token, i in backend.get_vocab(with_added_tokens=True).items()}
    specials = set(tokenizer.special_tokens.values())
    # The model may have more rows than the tokenizer has ids; llama.cpp wants one entry per row.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i in range(vocab_size)
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # both Kiln byte-level BPEs split text with GPT-2's pattern
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_bpe_merges(backend))
    if tokenizer.eos_id is not None:
        writer.add_bos_token_id(tokenizer.eos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
    if PAD in tokenizer.special_tokens:
        writer.add_pad_token_id(tokenizer.special_tokens[PAD])
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template(get_template(template).jinja)
