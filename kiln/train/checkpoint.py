"""A checkpoint is a folder a person can open: model.safetensors, config.json, tokenizer/, and the
training state (optimizer tensors in safetensors, the rest in JSON). Nothing goes through pickle, and a
folder is written atomically, so a save killed half way leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

import kiln
from kiln.atomic import atomic_dir
from kiln.data.tokenizers import Tokenizer, load_tokenizer
from kiln.errors import ConfigError, KilnError
from kiln.model.gpt import GPT, GPTConfig

CHECKPOINT_MARK = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass
class TrainingState:
    """Everything besides the weights that resuming needs: optimizer, RNG, data position, counters."""

    optimizers: list[dict] = field(default_factory=list)  # each optimizer's state_dict()
    progress: dict = field(default_factory=dict)  # step, tokens seen, best val loss, loader state, ...
    rng: torch.Tensor | None = None  # torch.get_rng_state()


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer | None
    info: dict
    state: TrainingState | None


def save_checkpoint(
    folder: str | os.PathLike,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    state: TrainingState | None = None,
    info: dict | None = None,
) -> Path:
    """Write the checkpoint folder atomically (temporary folder, then rename)."""
    folder = Path(folder)
    try:
        _write_checkpoint(folder, model, tokenizer, state, info)
    except OSError as e:
        raise KilnError(
            f"{folder}: could not write the checkpoint ({e.strerror or e}); the previous one there is intact. "
            "Free some disk space, then continue with --resume"
        ) from e
    return folder


def _write_checkpoint(
    folder: Path, model: GPT, tokenizer: Tokenizer | None, state: TrainingState | None, info: dict | None
) -> None:
    with atomic_dir(folder) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))  # keeps one copy of tied weights
        config = {
            "kiln": CHECKPOINT_MARK,
            "format_version": 1,
            "created_by": f"kiln {kiln.__version__}",
            "model": model.config.to_dict(),
            **(info or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        if state is not None:
            tensors, optimizer_meta = {}, []
            for number, state_dict in enumerate(state.optimizers):
                part_tensors, part_meta = _split_optimizer(state_dict, f"optimizer{number}")
                tensors.update(part_tensors)
                optimizer_meta.append(part_meta)
            if state.rng is not None:
                tensors["rng.torch"] = state.rng
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(
                json.dumps({"optimizers": optimizer_meta, "progress": state.progress}, indent=2) + "\n"
            )


def is_checkpoint(folder: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(folder) / CONFIG_FILE).read_text()).get("kiln") == CHECKPOINT_MARK
    except (OSError, ValueError, AttributeError):
        return False


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model (and tokenizer and training state, when saved) from a checkpoint folder."""
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise ConfigError(
            f"{folder}: not a Kiln checkpoint (no Kiln {CONFIG_FILE}); give a folder that "
            "`kiln train` wrote, such as RUN_DIR/last"
        )
    info = json.loads((folder / CONFIG_FILE).read_text())
    model = GPT(GPTConfig.from_dict(info["model"]))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise ConfigError(
            f"{folder / WEIGHTS_FILE}: weights do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR) if (folder / TOKENIZER_DIR).is_dir() else None
    state = None
    if (folder / STATE_JSON).is_file():
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS), device=str(device))
        optimizers = [
            _join_optimizer(tensors, part, f"optimizer{number}") for number, part in enumerate(meta["optimizers"])
        ]
        state = TrainingState(optimizers=optimizers, progress=meta["progress"], rng=tensors.get("rng.torch"))
    return Checkpoint(model.to(device), tokenizer, info, state)


def _split_optimizer(state_dict: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as flat tensors (for safetensors) plus the JSON-able remainder."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {
        "param_groups": state_dict["param_groups"],
        "scalars": scalars,
        "indices": [int(i) for i in state_dict["state"]],
    }


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    state: dict[int, dict] = {i: dict(meta["scalars"].get(str(i), {})) for i in meta["indices"]}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state[int(index)][name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
