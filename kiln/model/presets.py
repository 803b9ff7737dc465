"""Named model shapes, listed by `kiln presets`."""

from __future__ import annotations

import difflib

from kiln.errors import ConfigError
from kiln.model.gpt import GPTConfig

PRESETS: dict[str, tuple[str, dict]] = {
    "tiny": (
        "the smallest GPT-2 people start with: 2 layers, 2 heads, 128 wide",
        dict(n_layer=2, n_head=2, n_embd=128, block_size=256),
    ),
    "nanogpt-cpu": (
        "nanoGPT's documented CPU shape (4/4/128, block 64), for comparison",
        dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    ),
    "gpt2-124m": (
        "GPT-2 small: 12 layers, 12 heads, 768 wide, context 1024",
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    ),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of preset `name`, with `overrides` (e.g. vocab_size) applied on top."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown preset '{name}': {hint}`kiln presets` lists them")
    return GPTConfig.from_dict({**PRESETS[name][1], **overrides})
