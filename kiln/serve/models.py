"""The models a server holds: one base in memory with any number of LoRA adapters on it (peft), or a
full checkpoint and the base it was fine-tuned from, each under the name a request's `model` gives.

An `Engine` is one set of weights in memory and its KV-cache slots; the names on one engine differ only
in which adapter is switched on, so switching costs nothing and their requests share the slots.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.checkpoint import (
    TOKENIZER_DIR,
    adapter_base,
    is_adapter,
    is_checkpoint,
    load_checkpoint,
    read_info,
    run_name,
    shape_for_adapter,
)
from kiln.data.templates import Template, get_template
from kiln.data.tokenizers import Tokenizer, load_tokenizer
from kiln.errors import ConfigError
from kiln.generate.chat import STOPS, RunningText
from kiln.model.gpt import GPT
from kiln.model.kv_cache import SlotCache
from kiln.serve.auth import APIError

ROLES = ("base", "adapter", "tuned")  # as /v1/models shows them: the page's compare pairs base with the others


class Engine:
    """One model in memory (a GPT, or a GPT with peft adapters) and `slots` KV-cache slots for it."""

    def __init__(self, gpt: GPT, peft_model=None, slots: int = 8):
        self.gpt, self.peft, self.slots = gpt.eval(), peft_model, slots
        self._cache: SlotCache | None = None

    @property
    def cache(self) -> SlotCache:
        if self._cache is None:  # allocated on first use: a model only listed costs no cache memory
            self._cache = SlotCache(self.gpt, self.slots)
        return self._cache

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Run the block with `adapter` on, or with every adapter off (None): the base's own weights."""
        if self.peft is None:
            yield
            return
        if adapter is None:
            with self.peft.disable_adapter():
                yield
            return
        if self.peft.active_adapter != adapter:
            self.peft.set_adapter(adapter)
        yield


@dataclass
class ServedModel:
    id: str
    role: str
    engine: Engine
    adapter: str | None  # the peft adapter switched on for it; None: the engine's plain weights
    tokenizer: Tokenizer
    template: Template
    folder: Path
    base_id: str | None = None
    created: int = 0

    @property
    def stop(self) -> list[str]:
        """Strings that end a reply: an under-trained model may start the next turn instead of EOS."""
        return STOPS.get(self.template.name, [])

    @property
    def block_size(self) -> int:
        return self.engine.gpt.config.block_size

    def describe(self) -> dict:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "kiln",
            "kiln_role": self.role,
            "kiln_base": self.base_id,
            "kiln_template": self.template.name,
            "context_length": self.block_size,
        }


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means the weights its run gave back: its best/ (or last/ when it has no best/), or its
    last/ when it was fine-tuned with keep=last; a checkpoint or adapter folder is itself."""
    path = Path(path)
    if is_checkpoint(path) or is_adapter(path):
        return path
    kept_last = (read_info(path / "last").get("finetune") or {}).get("keep") == "last"
    for name in ("last", "best") if kept_last else ("best", "last"):
        if is_checkpoint(path / name) or is_adapter(path / name):
            return path / name
    raise ConfigError(
        f"{path}: not a Kiln checkpoint, adapter or run folder (no best/ or last/ in it); "
        "give a folder that `kiln train` or `kiln finetune` wrote"
    )


def _chat_template(info: dict) -> Template:
    template = get_template(info.get("template"))
    return RunningText() if template.name == "plain" else template


class ModelRegistry:
    """Every servable name; `slots` is how many requests one engine decodes together."""

    def __init__(self, device: torch.device | str = "cpu", slots: int = 8):
        self.device, self.slots = device, slots
        self.models: dict[str, ServedModel] = {}
        self.default: str | None = None  # what /v1/models lists first and the page picks
        self._lock = threading.Lock()

    def load(self, target: str | Path, adapters: dict[str, str | Path] | None = None) -> str:
        """Serve `target` (a run, checkpoint or adapter folder) and `adapters` (name -> adapter folder)
        on its base; returns the name served by default."""
        folder = resolve_checkpoint(target)
        adapters = {name: resolve_checkpoint(path) for name, path in (adapters or {}).items()}
        if is_adapter(folder):
            base = adapter_base(folder)
            adapters = {run_name(folder): folder, **adapters}
            main = run_name(folder)
        else:
            base, main = folder, run_name(folder)
        for name, adapter in adapters.items():
            if not is_adapter(adapter):
                raise ConfigError(f"--adapter {name}={adapter}: not a LoRA adapter (`kiln finetune --lora` writes one)")
            adapter_base(adapter, base)  # the adapter must fit this base's very weights
        if adapters:
            self._load_with_adapters(base, adapters)
        else:
            self._load_full(folder)
        self.default = main
        return main

    def add_checkpoint(self, model_id: str, folder: str | Path) -> str:
        """Load one more checkpoint (a run's best/, from the runs page) under `model_id`, and answer the id
        to use: a name that is served already is left as it is, and a folder that is served already
        (the one `kiln serve` started with, say) answers its own id instead of a second copy."""
        with self._lock:
            if model_id not in self.models:
                folder = resolve_checkpoint(folder)
                for served in self.models.values():
                    if served.folder.resolve() == folder.resolve():
                        return served.id
                if is_adapter(folder):
                    checkpoint = load_checkpoint(folder, self.device)  # on its own base, merged
                    self._add_full(model_id, "tuned", folder, checkpoint.model, checkpoint.tokenizer, checkpoint.info)
                else:
                    self._load_full(folder, model_id)
        return model_id

    def get(self, model_id: str | None) -> ServedModel:
        """The model a request names; an empty name means the default one."""
        served = self.models.get(model_id or self.default or "")
        if served is None:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this server has {', '.join(self.models)}",
                param="model",
                code="model_not_found",
            )
        return served

    def listing(self) -> list[dict]:
        """/v1/models: the default model first."""
        ordered = sorted(self.models.values(), key=lambda m: m.id != self.default)
        return [m.describe() for m in ordered]

    @property
    def engines(self) -> list[Engine]:
        return list({id(m.engine): m.engine for m in self.models.values()}.values())

    def _load_full(self, folder: Path, model_id: str | None = None) -> None:
        """A checkpoint; a fully fine-tuned one brings the base it was tuned from too, for compare."""
        checkpoint = load_checkpoint(folder, self.device)
        if checkpoint.tokenizer is None:
            raise ConfigError(f"{folder}: has no {TOKENIZER_DIR}/ folder, so replies cannot be turned into text")
        info = checkpoint.info
        tuned_from = Path((info.get("finetune") or {}).get("base") or "")
        has_base = info.get("finetune") and is_checkpoint(tuned_from)
        model_id = model_id or run_name(folder)
        base_id = None
        if has_base:
            base_id = self._unique(run_name(tuned_from))
            base = load_checkpoint(tuned_from, self.device)
            self._add_full(base_id, "base", tuned_from, base.model, base.tokenizer, base.info)
        role = "tuned" if has_base else "base"
        self._add_full(model_id, role, folder, checkpoint.model, checkpoint.tokenizer, info, base_id)

    def _add_full(self, model_id, role, folder, model, tokenizer, info, base_id=None) -> None:
        engine = Engine(model, slots=self.slots)
        self.models[model_id] = ServedModel(
            model_id, role, engine, None, tokenizer, _chat_template(info), folder, base_id, int(time.time())
        )

    def _load_with_adapters(self, base: Path, adapters: dict[str, Path]) -> None:
        """One base in memory, grown to the largest vocabulary an adapter added, each adapter by name."""
        from peft import PeftModel

        checkpoint = load_checkpoint(base, self.device)
        model = checkpoint.model
        block_sizes = {read_info(a)["model"]["block_size"] for a in adapters.values()}
        if len(block_sizes) > 1:
            raise ConfigError("--adapter: these adapters were trained at different context lengths; serve them apart")
        widest = max(adapters.values(), key=lambda a: read_info(a)["model"]["vocab_size"])
        shape_for_adapter(model, widest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes about custom (non-transformers) models
            peft_model = None
            for name, folder in adapters.items():
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
                else:
                    peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.to(self.device).eval()
        engine = Engine(peft_model.get_base_model(), peft_model, self.slots)
        now = int(time.time())
        base_id = self._unique(run_name(base), avoid=adapters)
        self.models[base_id] = ServedModel(
            base_id, "base", engine, None, checkpoint.tokenizer, _chat_template(checkpoint.info), base, None, now
        )
        for name, folder in adapters.items():
            info = read_info(folder)
            tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
            self.models[name] = ServedModel(
                name, "adapter", engine, name, tokenizer, _chat_template(info), folder, base_id, now
            )

    def _unique(self, name: str, avoid=()) -> str:
        candidate, number = name, 2
        while candidate in self.models or candidate in avoid:
            candidate, number = f"{name}-{number}", number + 1
        return candidate
