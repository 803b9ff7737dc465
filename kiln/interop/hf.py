"""`kiln export --to hf` and `kiln import`: Kiln checkpoints <-> Hugging Face model folders.

Export builds the transformers model, loads Kiln's weights into it (strictly: every weight placed, none
left over) and lets `save_pretrained` write the folder, so the layout is exactly transformers' own.
Import goes the other way through `from_pretrained`, which reads safetensors (or, for old `.bin`
folders, loads with weights_only) and ties what the config says is tied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from kiln.atomic import atomic_dir, refuse_to_replace
from kiln.checkpoint import Checkpoint, is_adapter, is_checkpoint, load_checkpoint, save_checkpoint
from kiln.data.templates import get_template
from kiln.data.tokenizers.bpe import PAD
from kiln.errors import ConfigError, KilnError
from kiln.interop.layouts import from_hf_state_dict, hf_config, kiln_config, to_hf_state_dict
from kiln.interop.tokenizer_files import load_hf_tokenizer, save_hf_tokenizer
from kiln.model.gpt import GPT

# Short names people use for the GPT-2 family, and the Hub repositories that hold them.
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# What a causal LM folder needs; everything else on the Hub (other frameworks' weights, ONNX) is skipped.
HUB_FILES = ["*.json", "*.safetensors", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _quiet_transformers() -> None:
    """Kiln prints its own progress; transformers' per-file bars and advice would only add noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def export_hf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Write `checkpoint` (a Kiln checkpoint, or an adapter merged onto its base) as a transformers folder."""
    from transformers import AutoModelForCausalLM

    refuse_to_replace(Path(out), force)
    _quiet_transformers()
    loaded = load_checkpoint(checkpoint, base=base)
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    if tokenizer is None:
        raise KilnError(f"{checkpoint}: has no tokenizer/ folder; an export needs the tokenizer the model reads")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise KilnError(
            f"{checkpoint}: its tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}"
        )
    eos = tokenizer.eos_id
    config = hf_config(model.config, bos_id=eos, eos_id=eos, pad_id=tokenizer.special_tokens.get(PAD))
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    if missing or unexpected:  # a mapping bug, not a user mistake: say exactly what did not line up
        raise RuntimeError(f"export mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    template = loaded.info.get("template")
    chat_template = get_template(template).jinja if template else None
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf_model.save_pretrained(str(tmp))
        save_hf_tokenizer(tokenizer, tmp, max_length=model.config.block_size, chat_template=chat_template)
    return out


def hf_folder(source: str | os.PathLike) -> Path:
    """A local Hugging Face model folder for `source`: the folder itself, or a Hub id (or short name such
    as gpt2) fetched through huggingface_hub's cache."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    spec = str(source)
    if path.exists() or not _HUB_ID.match(spec):
        raise ConfigError(f"{spec}: give a Hugging Face model folder, or a Hub id such as gpt2 or distilgpt2")
    repo = HUB_NAMES.get(spec, spec)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise KilnError(
            f"{spec}: cannot fetch {repo} from the Hugging Face Hub ({_first_line(e)}). Where there is a network, run "
            f"`hf download {repo} --local-dir {spec.split('/')[-1]}`, bring that folder here and give its path instead"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def load_hf(source: str | os.PathLike) -> Checkpoint:
    """A Hugging Face GPT-2 or Llama checkpoint as a Kiln model and tokenizer (fp32), in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    folder = hf_folder(source)
    try:
        hf = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{folder / 'config.json'}: cannot be read ({_first_line(e)}); it is damaged, or not a model's config"
        ) from None
    config = kiln_config(hf, str(folder))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, cut short, not safetensors
        raise ConfigError(
            f"{folder}: cannot load the model's weights ({_first_line(e)}); they are missing, damaged or cut short, "
            "so fetch the model again"
        ) from None
    weights = from_hf_state_dict(hf_model.state_dict(), config, str(folder))
    model = GPT(config)
    model.load_state_dict(weights, strict=True)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise KilnError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model {config.vocab_size}")
    info = {"imported_from": {"source": str(source), "folder": str(folder.resolve()), "model_type": hf.model_type}}
    return Checkpoint(model.eval(), tokenizer, info, None)


def import_hf(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Convert a Hugging Face checkpoint into a Kiln checkpoint folder."""
    refuse_to_replace(Path(out), force)
    loaded = load_hf(source)
    return save_checkpoint(out, loaded.model, loaded.tokenizer, info=loaded.info)


def load_starting_point(spec: str | os.PathLike) -> Checkpoint:
    """What --init-from names: a Kiln checkpoint (or adapter), a Hugging Face folder, or a Hub id."""
    if is_checkpoint(spec) or is_adapter(spec):
        return load_checkpoint(spec)
    return load_hf(spec)
