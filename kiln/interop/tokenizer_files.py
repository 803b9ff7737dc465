"""Kiln tokenizers as Hugging Face tokenizer folders, and back.

Every Kiln tokenizer becomes a real `tokenizers` tokenizer.json that transformers' fast tokenizer loads
and that encodes exactly as Kiln does: GPT-2's and trained byte-level BPEs are BPE models already; a
char vocabulary is a BPE model with no merges (every character its own token) and a decoder that joins
the pieces without spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kiln.data.fetch import file_sha256
from kiln.data.registry import get_dataset
from kiln.data.tokenizers import EOS, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from kiln.data.tokenizers.bpe import PAD
from kiln.data.tokenizers.char import UNK
from kiln.errors import TokenizerError

HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
HF_SPECIAL_TOKENS, HF_VOCAB, HF_MERGES = "special_tokens_map.json", "vocab.json", "merges.txt"


def hf_backend(tokenizer: Tokenizer) -> HFTokenizer:
    """A `tokenizers` Tokenizer that maps text to the same ids as `tokenizer`."""
    if isinstance(tokenizer, BPETokenizer):
        return HFTokenizer.from_str(tokenizer.hf.to_str())
    if isinstance(tokenizer, GPT2Tokenizer):
        backend = HFTokenizer(models.BPE.from_file(str(tokenizer.encoder_json), str(tokenizer.vocab_bpe)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    elif isinstance(tokenizer, CharTokenizer):
        vocab = {tokenizer.decode([i]): i for i in range(tokenizer.vocab_size)}
        unk = UNK if tokenizer.unk_id is not None else None
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
        backend.decoder = decoders.Fuse()
    else:
        raise TokenizerError(f"a {tokenizer.kind} tokenizer has no Hugging Face form")
    # Specials already in the vocabulary keep their ids; later ones (GPT-2's added tokens) take the next.
    by_id = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in by_id if name != UNK])
    return backend


def save_hf_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int, chat_template: str | None = None) -> None:
    """Write tokenizer.json, tokenizer_config.json (with `chat_template`) and special_tokens_map.json, and
    for byte-level BPEs vocab.json + merges.txt: the files transformers' `save_pretrained` writes."""
    from transformers import PreTrainedTokenizerFast

    backend = hf_backend(tokenizer)
    specials = tokenizer.special_tokens
    named = {"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}  # GPT-2's convention: BOS = EOS
    named = {role: name for role, name in named.items() if name in specials}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, clean_up_tokenization_spaces=False, **named
    )
    fast.save_pretrained(str(folder))
    # transformers 5 writes the chat template to its own file; 4 and 5 both read it from the config.
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / HF_TOKENIZER_CONFIG).read_text())
    if chat_template:
        config["chat_template"] = chat_template
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / HF_SPECIAL_TOKENS).write_text(json.dumps(named, indent=2) + "\n")
    if isinstance(backend.model, models.BPE) and not isinstance(tokenizer, CharTokenizer):
        backend.model.save(str(folder))  # vocab.json + merges.txt, for the slow GPT2Tokenizer


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    """The Kiln tokenizer for a Hugging Face model folder: GPT-2's own vocabulary becomes the tiktoken
    `gpt2` tokenizer (with any tokens added after it); any other tokenizer.json is used as it is."""
    merges, vocab, backend_file = folder / HF_MERGES, folder / HF_VOCAB, folder / HF_TOKENIZER_FILE
    if (
        merges.is_file()
        and vocab.is_file()
        and file_sha256(merges) == get_dataset("gpt2-tokenizer").files["merges"].sha256
    ):
        added = ()
        if backend_file.is_file():
            try:
                tokens = json.loads(backend_file.read_text(encoding="utf-8")).get("added_tokens", [])
                later = sorted((t for t in tokens if t["id"] > 50256), key=lambda t: t["id"])
            except (ValueError, AttributeError, TypeError, KeyError) as e:
                why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                raise TokenizerError(
                    f"{backend_file}: cannot read it ({why}); it is damaged, or not a tokenizer.json"
                ) from None
            if [t["id"] for t in later] != list(range(50257, 50257 + len(later))):
                raise TokenizerError(f"{backend_file}: tokens added after GPT-2's must take ids 50257, 50258, ...")
            added = tuple(t["content"] for t in later)
        return GPT2Tokenizer(vocab, merges, added)
    if backend_file.is_file():
        try:
            return BPETokenizer(HFTokenizer.from_file(str(backend_file)))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{backend_file}: cannot load it ({e})") from None
    raise TokenizerError(
        f"{folder}: no tokenizer.json (or GPT-2's vocab.json + merges.txt); add the model's tokenizer files"
    )
