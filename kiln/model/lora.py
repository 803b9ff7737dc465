"""LoRA on Kiln's GPT through the `peft` library: which layers take adapters, and merging them back.

The fused q/k/v projection is `attn.qkv` (GPT-2's `c_attn`), so `--lora-targets attn` is what peft
does to GPT-2 by default. Tokens added to the vocabulary by fine-tuning are trained through peft's
trainable-token rows: in the embedding, kept tied to the output head, or in both when the head is untied,
so the model can learn to emit them; every other base weight stays frozen.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from kiln.errors import ConfigError
from kiln.model.gpt import GPT

TARGETS = {
    "attn": ["attn.qkv"],
    "mlp": ["mlp.up", "mlp.down"],
    "all": ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"],
}


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "attn"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--lora-r {self.r} must be at least 1")
        if self.targets not in TARGETS:
            raise ConfigError(f"--lora-targets {self.targets}: choose one of {', '.join(TARGETS)}")
        if not self.alpha > 0:  # alpha / r scales the adapter: 0 would train it to no effect
            raise ConfigError(f"--lora-alpha {self.alpha} must be above 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout {self.dropout} must be at least 0 and below 1")


def add_lora(model: GPT, settings: LoraSettings, new_token_ids: list[int] | None = None) -> nn.Module:
    """The model wrapped by peft, with only the adapters (and the rows of `new_token_ids`) trainable."""
    from peft import LoraConfig, get_peft_model

    rows = None
    if new_token_ids:
        rows = {"wte": list(new_token_ids)}
        if not model.config.tie_word_embeddings:
            # an untied head has rows of its own: without them a new token (a template's EOS) is read
            # but can never be written
            rows["lm_head"] = list(new_token_ids)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=TARGETS[settings.targets],
        trainable_token_indices=rows,
        ensure_weight_tying=bool(new_token_ids) and model.config.tie_word_embeddings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about custom (non-transformers) models
        return get_peft_model(model, config)


def load_lora(model: GPT, adapter_dir: str) -> nn.Module:
    """`model` with the saved adapter in `adapter_dir` applied (not merged)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, adapter_dir)


def merge_lora(peft_model: nn.Module) -> GPT:
    """Fold the adapter into the base weights: a plain GPT that computes what the adapted one did."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model.merge_and_unload()


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within it a peft model computes what its base does (adapters and trainable token rows off), from
    the same weights in memory; any other model is just itself."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared tensors once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
