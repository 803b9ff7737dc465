"""A checkpoint is a folder a person can open: model.safetensors, config.json, tokenizer/, and the
training state (optimizer tensors in safetensors, the rest in JSON). Nothing goes through pickle, and a
folder is written atomically, so a save killed half way leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

import kiln
from kiln.atomic import atomic_dir
from kiln.data.fetch import file_sha256
from kiln.data.tokenizers import Tokenizer, load_tokenizer
from kiln.errors import ConfigError, KilnError
from kiln.model.gpt import GPT, GPTConfig

CHECKPOINT_MARK = "checkpoint"
ADAPTER_MARK = "adapter"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass
class TrainingState:
    """Everything besides the weights that resuming needs: optimizer state and counters. The data
    position and the dropout RNG follow from the step, so the step is all they need."""

    optimizers: list[dict] = field(default_factory=list)  # each optimizer's state, keyed by parameter name
    progress: dict = field(default_factory=dict)  # step, best val loss, time spent, schedule length, ...


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
    with _saving(folder, "checkpoint", resumable=state is not None):
        _write_checkpoint(folder, model, tokenizer, state, info)
    return folder


@contextmanager
def _saving(folder: Path, what: str, resumable: bool) -> Iterator[None]:
    """A save that cannot be written (a full disk, a read-only place) is one line; the atomic write
    has left whatever `folder` held before as it was."""
    try:
        yield
    except OSError as e:
        then = "then continue with --resume" if resumable else "then run the command again"
        raise KilnError(
            f"{folder}: could not write the {what} ({e.strerror or e}); the previous one there is intact. "
            f"Free some disk space (or choose a place you can write to), {then}"
        ) from e


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
            _write_state(tmp, state)


def _write_state(folder: Path, state: TrainingState) -> None:
    tensors, optimizer_meta = {}, []
    for number, state_dict in enumerate(state.optimizers):
        part_tensors, part_meta = _split_optimizer(state_dict, f"optimizer{number}")
        tensors.update(part_tensors)
        optimizer_meta.append(part_meta)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(
        json.dumps({"optimizers": optimizer_meta, "progress": state.progress}, indent=2) + "\n"
    )


def load_training_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> TrainingState | None:
    """The training state saved beside a checkpoint's (or adapter's) weights, or None when it has none."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        return None
    with _damaged_file(folder / STATE_JSON):
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    with _damaged_file(folder / STATE_TENSORS):
        tensors = load_file(str(folder / STATE_TENSORS), device=str(device))
    optimizers = [
        _join_optimizer(tensors, part, f"optimizer{number}") for number, part in enumerate(meta["optimizers"])
    ]
    return TrainingState(optimizers=optimizers, progress=meta["progress"])


def resumable_step(folder: str | os.PathLike) -> int | None:
    """The step a checkpoint (or adapter) folder was saved at, when it reads back whole: its config,
    its training state and the headers of its tensor files; None otherwise."""
    from safetensors import safe_open

    folder = Path(folder)
    if _mark(folder) not in (CHECKPOINT_MARK, ADAPTER_MARK):
        return None
    weights = folder / (WEIGHTS_FILE if _mark(folder) == CHECKPOINT_MARK else "adapter_model.safetensors")
    try:
        step = int(json.loads((folder / STATE_JSON).read_text())["progress"]["step"])
        for path in (weights, folder / STATE_TENSORS):
            with safe_open(str(path), "pt") as tensors:
                tensors.keys()
    except Exception:  # noqa: BLE001 (OSError, bad JSON, a missing key, or safetensors' own errors)
        return None
    return step


def read_info(folder: str | os.PathLike) -> dict:
    """A checkpoint's or adapter's config.json ({} when there is none to read)."""
    try:
        info = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def model_config(folder: str | os.PathLike) -> GPTConfig:
    """The model shape a checkpoint's (or adapter's) config.json records."""
    try:
        return GPTConfig.from_dict(read_info(folder)["model"])
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as e:
        why = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ConfigError(
            f"{Path(folder) / CONFIG_FILE}: its model settings cannot be read ({why}); "
            "use another checkpoint, or train again"
        ) from None


def _mark(folder: str | os.PathLike) -> str | None:
    return read_info(folder).get("kiln")


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return _mark(folder) == CHECKPOINT_MARK


def is_adapter(folder: str | os.PathLike) -> bool:
    return _mark(folder) == ADAPTER_MARK


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of a checkpoint's weights file: what an adapter records of the base it was trained on."""
    return file_sha256(Path(folder) / WEIGHTS_FILE)


def save_adapter(
    folder: str | os.PathLike,
    peft_model,
    base: str | os.PathLike,
    tokenizer: Tokenizer,
    info: dict | None = None,
    state: TrainingState | None = None,
) -> Path:
    """Write a LoRA adapter folder: peft's adapter files, the tokenizer, a config.json naming the base
    checkpoint (path and weights checksum) and the model shape the adapter applies to, and the training
    state when given."""
    folder = Path(folder)
    with _saving(folder, "adapter", resumable=state is not None), atomic_dir(folder) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about this run
        config = {
            "kiln": ADAPTER_MARK,
            "format_version": 1,
            "created_by": f"kiln {kiln.__version__}",
            "base": str(Path(base).resolve()),
            "base_sha256": weights_fingerprint(base),
            "model": peft_model.get_base_model().config.to_dict(),
            **(info or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_DIR)
        if state is not None:
            _write_state(tmp, state)
    return folder


def load_checkpoint(
    folder: str | os.PathLike, device: str | torch.device = "cpu", base: str | os.PathLike | None = None
) -> Checkpoint:
    """Rebuild the model (and tokenizer and training state, when saved) from a checkpoint folder. An
    adapter folder is applied to its base checkpoint (or `base`) and merged into it."""
    folder = Path(folder)
    if is_adapter(folder):
        return _load_adapter(folder, device, base)
    if not is_checkpoint(folder):
        raise ConfigError(
            f"{folder}: not a Kiln checkpoint (no Kiln {CONFIG_FILE}); give a folder that "
            "`kiln train` or `kiln finetune` wrote, such as RUN_DIR/best"
        )
    info = read_info(folder)
    model = GPT(model_config(folder))
    with _damaged_file(folder / WEIGHTS_FILE):
        try:
            missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False, device=str(device))
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            first = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
            raise ConfigError(
                f"{folder / WEIGHTS_FILE}: weights do not match config.json ({first[:160]}); "
                "use another checkpoint, or train again"
            ) from None
    if missing or unexpected:
        raise ConfigError(
            f"{folder / WEIGHTS_FILE}: weights do not match config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR) if (folder / TOKENIZER_DIR).is_dir() else None
    return Checkpoint(model.to(device), tokenizer, info, load_training_state(folder, device))


def adapter_base(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base checkpoint an adapter folder applies to (its own record, or `base`), checked to hold
    the very weights the adapter was trained on."""
    folder = Path(folder)
    info = read_info(folder)
    if not isinstance(info.get("base"), str) or not isinstance(info.get("base_sha256"), str):
        raise ConfigError(
            f"{folder / CONFIG_FILE}: does not record the adapter's base (base and base_sha256); "
            "use an adapter folder that `kiln finetune --lora-r` wrote"
        )
    base = Path(base or info["base"])
    if not is_checkpoint(base):
        raise ConfigError(
            f"{folder}: its base checkpoint {base} is not there or not a Kiln checkpoint; "
            "pass the base folder with --base"
        )
    if weights_fingerprint(base) != info["base_sha256"]:
        raise ConfigError(
            f"{folder}: this adapter was trained on other weights than {base} holds "
            f"(sha256 {info['base_sha256'][:12]}...); give the base it was trained on"
        )
    return base


def run_name(folder: Path) -> str:
    """What a checkpoint is called: its run's folder name for RUN/best or RUN/last, else its own name."""
    folder = folder.resolve()
    return folder.parent.name if folder.name in ("best", "last") else folder.name


def tuned_from(folder: str | os.PathLike) -> Path | None:
    """The base checkpoint a fine-tuned folder came from (an adapter's base, or the starting point a
    full fine-tune recorded), or None for a model that was not fine-tuned or whose base has gone."""
    folder = Path(folder)
    if is_adapter(folder):
        return adapter_base(folder)
    base = (read_info(folder).get("finetune") or {}).get("base")
    return Path(base) if base and is_checkpoint(base) else None


def shape_for_adapter(model: GPT, folder: str | os.PathLike) -> None:
    """Grow `model` (the adapter's base) to the vocabulary and context the adapter was trained with."""
    shape = model_config(folder)
    model.resize_vocab(shape.vocab_size)
    model.resize_context(shape.block_size)


def _load_adapter(folder: Path, device: str | torch.device, base: str | os.PathLike | None) -> Checkpoint:
    from kiln.model.lora import load_lora, merge_lora

    checkpoint = load_checkpoint(adapter_base(folder, base), device)
    model = checkpoint.model
    shape_for_adapter(model, folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # peft would look for them on the Hub
        if not (folder / name).is_file():
            raise ConfigError(f"{folder / name}: is missing; use another adapter, or fine-tune again")
    with _damaged_file(folder / "adapter_config.json"):
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    with _damaged_file(folder / "adapter_model.safetensors"):
        merged = merge_lora(load_lora(model, str(folder)))
    return Checkpoint(merged.to(device), load_tokenizer(folder / TOKENIZER_DIR), read_info(folder), None)


@contextmanager
def _damaged_file(path: Path) -> Iterator[None]:
    """A file that is missing, cut short or not what it should be at all (not safetensors, not JSON) is
    one line naming it."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            what = "is missing"
        elif path.is_dir():
            what = "is a folder, where a file should be"
        elif isinstance(e, OSError):
            what = f"cannot be read ({e.strerror or e})"
        else:
            what = f"cannot be read ({str(e).splitlines()[0][:120]}): it is damaged or cut short"
        raise ConfigError(
            f"{path}: {what}; use another checkpoint (such as the run's best/ or last/), or train again"
        ) from None


def _split_optimizer(state_dict: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict (keyed by parameter index or name) as flat tensors for safetensors, plus
    the JSON-able remainder."""
    tensors, entries = {}, []
    for position, (key, values) in enumerate(state_dict["state"].items()):
        entry = {"key": key, "scalars": {}, "tensors": []}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}/{position}/{name}"] = value.contiguous()
                entry["tensors"].append(name)
            else:
                entry["scalars"][name] = value
        entries.append(entry)
    return tensors, {"param_groups": state_dict["param_groups"], "entries": entries}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    if "indices" in meta:  # written before optimizer state was keyed by name: parameter indices
        state = {i: dict(meta["scalars"].get(str(i), {})) for i in meta["indices"]}
        for key, value in tensors.items():
            if key.startswith(prefix + "."):
                _, index, name = key.split(".", 2)
                state[int(index)][name] = value
        return {"state": state, "param_groups": meta["param_groups"]}
    state = {}
    for position, entry in enumerate(meta["entries"]):
        values = dict(entry["scalars"])
        values.update({name: tensors[f"{prefix}/{position}/{name}"] for name in entry["tensors"]})
        state[entry["key"]] = values
    return {"state": state, "param_groups": meta["param_groups"]}
