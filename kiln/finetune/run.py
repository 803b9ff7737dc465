"""What `kiln finetune` does around the loop, for instruction fine-tuning and for preference tuning
(DPO): load the base and the data, make room in the vocabulary for the template's tokens, wrap LoRA
adapters, train with a progress bar, and report."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from kiln.checkpoint import (
    Checkpoint,
    TrainingState,
    is_checkpoint,
    load_checkpoint,
    load_training_state,
    read_info,
    resumable_step,
    save_adapter,
    save_checkpoint,
)
from kiln.data.instructions import Conversation, InstructionData, load_instructions
from kiln.data.preferences import load_preferences
from kiln.data.templates import Template, get_template
from kiln.data.tokenizers import Tokenizer
from kiln.data.words import WordCounter
from kiln.device import pick_device
from kiln.distributed import launched_world
from kiln.errors import ConfigError
from kiln.finetune.augment import with_swapped_words
from kiln.finetune.dpo import Pairs, dpo_settings, run_dpo
from kiln.finetune.examples import encode_conversations, steps_per_epoch
from kiln.finetune.sft import finetune_settings, run_sft
from kiln.generate.sampling import SamplingConfig, stream_reply
from kiln.model.gpt import GPT
from kiln.model.lora import LoraSettings, add_lora, count_parameters
from kiln.progress import progress_bar
from kiln.train.engine import (
    METRICS_FILE,
    TrainResult,
    describe_setup,
    newest_checkpoint,
    planned_steps,
    recover_run,
)


def prepare_vocabulary(
    model: GPT, tokenizer: Tokenizer, template: Template, data: InstructionData
) -> tuple[Tokenizer, list[int]]:
    """Add what the template and data need (special tokens; for char vocabularies, new characters)
    to the tokenizer, grow the model to match, and return the tokenizer and the new ids."""
    chars = {c for conv in data.conversations for piece in template.render(conv.messages) for c in piece.text}
    grown = tokenizer.with_added(chars=chars, specials=template.special_tokens)
    model.resize_vocab(grown.vocab_size)
    return grown, list(range(tokenizer.vocab_size, grown.vocab_size))


def count_words(tokenizer: Tokenizer, conversations: list[Conversation]) -> None:
    """Add the words of the training examples to the words the model has read, when the tokenizer keeps
    count of them (a model made elsewhere keeps none, and a count of the examples alone is too narrow)."""
    if tokenizer.words is not None:
        texts = (f"{m.content} {m.context}" for c in conversations for m in c.messages)
        tokenizer.words = dict(WordCounter(tokenizer.words).add_all(texts).counts)


def finetune_and_report(
    base: str | os.PathLike,
    data_spec: str,
    out: Path,
    settings: dict,
    lora: LoraSettings | None = None,
    data_format: str | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> Path:
    """Fine-tune the checkpoint `base` on instruction data into `out` (or continue the run there from its
    `last/`); returns the kept weights' folder (`best/` unless `keep=last`; a full checkpoint, or an adapter
    folder with LoRA)."""
    config, train_config = finetune_settings(settings)
    checkpoint = _start(base, data_spec, out, lora, resume, train_config.seed)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    data = load_instructions(data_spec, data_dir, data_format)
    template = get_template(config.template or ("chat" if data.format == "chat" else "alpaca"))
    tokenizer, new_ids = prepare_vocabulary(model, tokenizer, template, data)
    if config.block_size:
        model.resize_context(config.block_size)
    splits = data.split(seed=config.split_seed)
    count_words(tokenizer, splits["train"])
    originals = len(splits["train"])
    splits["train"] = with_swapped_words(
        splits["train"], config.word_swaps, seed=config.split_seed, originals=config.original_copies
    )
    encoded, truncated = {}, 0
    for name, conversations in splits.items():
        encoded[name], cut = encode_conversations(
            conversations, template, tokenizer, model.config.block_size, config.prompt_loss
        )
        truncated += cut
    if not encoded["val"]:
        raise ConfigError(
            f"{data.source}: {len(data.conversations)} examples leave no val split (it takes 10%, rounded down); "
            "give at least 10 examples"
        )
    print(
        f"data: {data.source} ({data.format}, {len(data.conversations):,} examples): "
        + ", ".join(f"{name} {len(examples):,}" for name, examples in encoded.items())
        + f"; template {template.name}"
    )
    added = [f"{config.original_copies} of each original example"] if config.original_copies > 1 else []
    if config.word_swaps:
        copies = len(splits["train"]) - config.original_copies * originals
        added.append(
            f"{copies:,} word-swapped copies ({config.word_swaps} of each example whose answer repeats "
            "words of its question)"
        )
    if added:
        print(f"train holds {' and '.join(added)}")
    if data.duplicates:
        print(
            f"dropped {data.duplicates:,} exact duplicate examples before splitting "
            "(so that none is both trained on and held out)"
        )
    if truncated:
        print(
            f"warning: {truncated:,} examples are longer than the context of {model.config.block_size} tokens "
            "and were truncated (prompt first); a larger --set block_size keeps more of them"
        )
    if new_ids:
        print(f"vocabulary: added {len(new_ids)} tokens for the template and data ({tokenizer.describe()})")

    trained = _trainable(model, lora, new_ids)
    info = {
        "template": template.name,
        "finetune": {
            "base": str(Path(base).resolve()),
            "data": data_spec,
            "format": data.format,
            "split_seed": config.split_seed,
            "lora": asdict(lora) if lora else None,
            "keep": config.keep,  # which of the run's folders a run-folder path means (kiln serve)
        },
    }
    save, restore = _writers(base, tokenizer, info, lora)
    print(describe_setup(train_config, model.config))
    epoch_steps = steps_per_epoch(len(encoded["train"]), train_config.rows_per_step)
    with progress_bar("fine-tuning", total=planned_steps(train_config, epoch_steps, None), unit="steps") as advance:
        result = run_sft(
            trained,
            encoded["train"],
            encoded["val"],
            config,
            train_config,
            tokenizer.eos_id,
            out,
            save,
            restore,
            resume=resume,
            on_step=lambda step, loss: advance(1, f"fine-tuning, loss {loss:.3f}"),
            on_estimate=lambda steps, seconds: advance(0, total=steps),
            lora=lora is not None,
        )
    kept = out / config.keep
    if launched_world().is_main:
        _report(result, kept, epoch_steps)
        _show_example(kept, splits["test"] or splits["val"], train_config.device)
    return kept


def preference_tune_and_report(
    base: str | os.PathLike,
    data_spec: str,
    out: Path,
    settings: dict,
    lora: LoraSettings | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> Path:
    """Preference-tune the instruction-tuned checkpoint `base` with DPO on preference pairs into `out` (or
    continue the run there); the reference is `base` itself, frozen. Returns the best weights' folder."""
    config, dpo, train_config = dpo_settings(settings)
    method = {"method": "dpo", "beta": dpo.beta}
    checkpoint = _start(base, data_spec, out, lora, resume, train_config.seed, method)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    data = load_preferences(data_spec, data_dir)
    template = _tuned_template(checkpoint.info.get("template"), config.template, base)
    tokenizer, new_ids = prepare_vocabulary(model, tokenizer, template, data.as_instructions())
    if config.block_size:
        model.resize_context(config.block_size)
    splits = data.split(seed=config.split_seed)
    count_words(tokenizer, [c for pair in splits["train"] for c in pair.conversations()])
    encoded, truncated, left_out = {}, 0, 0
    for name, pairs in splits.items():
        encoded[name], cut, lost = Pairs.encode(pairs, template, tokenizer, model.config.block_size)
        truncated, left_out = truncated + cut, left_out + lost
    if not len(encoded["val"]):
        raise ConfigError(
            f"{data.source}: {len(data.pairs)} pairs leave no val split (it takes 10%, rounded down); "
            "give at least 10 pairs"
        )
    print(
        f"data: {data.source} ({len(data.pairs):,} preference pairs): "
        + ", ".join(f"{name} {len(pairs):,}" for name, pairs in encoded.items())
        + f"; template {template.name}"
    )
    if data.duplicates:
        print(f"dropped {data.duplicates:,} exact duplicate pairs before splitting")
    if data.identical:
        print(f"dropped {data.identical:,} pairs whose chosen answer is the rejected one (nothing to prefer)")
    if truncated:
        print(
            f"warning: {truncated:,} pairs are longer than the context of {model.config.block_size} tokens "
            "and were truncated (prompt first); a larger --set block_size keeps more of them"
        )
    if left_out:
        print(f"left out {left_out:,} pairs with an answer that starts past the context of {model.config.block_size}")
    if new_ids:
        print(f"vocabulary: added {len(new_ids)} tokens for the data ({tokenizer.describe()})")

    trained = _trainable(model, lora, new_ids)
    info = {
        "template": template.name,
        "finetune": {
            **method,
            "base": str(Path(base).resolve()),
            "data": data_spec,
            "format": "preferences",
            "split_seed": config.split_seed,
            "lora": asdict(lora) if lora else None,
        },
    }
    save, restore = _writers(base, tokenizer, info, lora)
    print(describe_setup(train_config, model.config) + f"; DPO beta {dpo.beta:g}")
    epoch_steps = steps_per_epoch(len(encoded["train"]), train_config.rows_per_step)
    with progress_bar("DPO", total=planned_steps(train_config, epoch_steps, None), unit="steps") as advance:
        result = run_dpo(
            trained,
            encoded["train"],
            encoded["val"],
            config,
            dpo,
            train_config,
            tokenizer.eos_id,
            out,
            save,
            restore,
            resume=resume,
            on_step=lambda step, loss: advance(1, f"DPO, loss {loss:.3f}"),
            on_estimate=lambda steps, seconds: advance(0, total=steps),
            lora=lora is not None,
        )
    if launched_world().is_main:
        _report(result, out / "best", epoch_steps)
        _report_preferences(out / METRICS_FILE, len(encoded["val"]))
        held_out = splits["test"] or splits["val"]
        _show_example(out / "best", [pair.conversations()[0] for pair in held_out], train_config.device)
    return out / "best"


def _tuned_template(saved: str | None, asked: str | None, base: str | os.PathLike) -> Template:
    """The template the base was instruction-tuned with; DPO goes on in it."""
    if saved and asked and saved != asked:
        raise ConfigError(f"{base}: was instruction-tuned with the {saved} template; DPO keeps it (drop --template)")
    if not saved:
        print(
            f"note: {base} records no template, so it was not instruction-tuned; DPO works best from a model "
            f"that already answers. Using the {asked or 'alpaca'} template"
        )
    return get_template(saved or asked or "alpaca")


def _report_preferences(metrics_file: Path, pairs: int) -> None:
    """Held-out preference figures at the start and at the best evaluation."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    first, best = rows[0], min(rows, key=lambda row: row["val_loss"])
    print(
        f"held-out pairs ({pairs:,}), best weights (step {best['step']:,}): preference accuracy "
        f"{best['val_preference_accuracy']:.1%}, mean reward margin {best['val_reward_margin']:.3f}; "
        f"chosen answer likelier than the rejected one {first['val_chosen_likelier']:.1%} before, "
        f"{best['val_chosen_likelier']:.1%} after"
    )


def _start(
    base: str | os.PathLike,
    data_spec: str,
    out: Path,
    lora: LoraSettings | None,
    resume: bool,
    seed: int,
    method: dict | None = None,
) -> Checkpoint:
    """The base checkpoint, loaded once `out` is known to be a new run's folder, or (with `resume`) to
    hold this run's own checkpoint; torch's seed set for the new vocabulary rows and LoRA weights."""
    if lora and not is_checkpoint(base):
        raise ConfigError(f"{base}: LoRA needs a full Kiln checkpoint as its base; merge an adapter first (kiln merge)")
    if resume:
        if launched_world().is_main:
            recover_run(out)
        _check_resumable(newest_checkpoint(out), base, data_spec, lora, method)
    elif (out / "best").exists() or (out / "last").exists():
        raise ConfigError(
            f"{out}: already holds a fine-tuning run; pass --resume to continue it or choose another --out"
        )
    checkpoint = load_checkpoint(base)
    torch.manual_seed(seed)  # new vocabulary rows and LoRA weights start from the seed
    if checkpoint.tokenizer is None:
        raise ConfigError(f"{base}: has no tokenizer/ folder to encode the instructions with")
    return checkpoint


def _trainable(model: GPT, lora: LoraSettings | None, new_ids: list[int]) -> torch.nn.Module:
    """The model to train: wrapped with LoRA adapters, or itself; says how many weights will train."""
    trained = add_lora(model, lora, new_ids) if lora else model
    trainable, total = count_parameters(trained)
    what = f"LoRA r={lora.r} alpha={lora.alpha:g} on {lora.targets}" if lora else "full fine-tuning"
    print(f"{what}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return trained


def _writers(base: str | os.PathLike, tokenizer: Tokenizer, info: dict, lora: LoraSettings | None):
    """The stage's save and restore: a full checkpoint, or with LoRA an adapter folder naming `base`."""

    def save(folder: Path, module, state: TrainingState | None) -> None:
        if lora:
            save_adapter(folder, module, base, tokenizer, info, state)
        else:
            save_checkpoint(folder, module, tokenizer, state, info)

    def restore(folder: Path, module) -> TrainingState:
        return _restore(folder, module, lora is not None)

    return save, restore


def _check_resumable(
    folder: Path, base: str | os.PathLike, data_spec: str, lora: LoraSettings | None, method: dict | None = None
) -> None:
    """A fine-tuning run continues only from its own checkpoint, with the base, data and method
    (`method`: DPO's {"method": "dpo", "beta": ...}; None for instruction fine-tuning) it began with."""
    if resumable_step(folder) is None:
        raise ConfigError(f"{folder}: no fine-tuning checkpoint to resume; drop --resume to start a new run")
    saved = read_info(folder).get("finetune", {})
    if saved.get("base") != str(Path(base).resolve()) or saved.get("data") != data_spec:
        raise ConfigError(
            f"{folder}: was fine-tuned from {saved.get('base')} on {saved.get('data')}; "
            "resume with the same base and --data"
        )
    began = {key: saved[key] for key in ("method", "beta") if key in saved} or None
    if began != method:
        how = f"--method {began['method']} --beta {began['beta']:g}" if began else "--method sft"
        raise ConfigError(f"{folder}: was trained with {how}; resume with the same")
    if bool(saved.get("lora")) != bool(lora) or (lora and saved.get("lora") != asdict(lora)):
        raise ConfigError(f"{folder}: was trained with LoRA settings {saved.get('lora')}; resume with the same ones")


def _restore(folder: Path, module, lora: bool) -> TrainingState:
    """Load `folder`'s trained weights into `module` (the whole model, or the adapter of a peft model)."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, load_file(str(folder / "adapter_model.safetensors")))
    else:
        module.load_state_dict(load_checkpoint(folder).model.state_dict())
    return load_training_state(folder)


def _report(result: TrainResult, kept: Path, epoch_steps: int) -> None:
    print(
        f"done: {result.steps:,} steps ({result.steps / epoch_steps:.2f} epochs) in {result.seconds:.0f}s"
        + (" (stopped early: val loss stopped improving)" if result.stopped_early else "")
        + f"; val loss {result.first_val_loss:.4f} before, {result.best_val_loss:.4f} best"
        + (f", {result.last_val_loss:.4f} last" if kept.name == "last" else "")
    )
    print(f"{kept.name} weights: {kept}; metrics: {kept.parent / 'metrics.jsonl'}")


def _show_example(best: Path, conversations: list, device: str) -> None:
    checkpoint = load_checkpoint(best, pick_device(device))
    template = get_template(checkpoint.info.get("template"))
    example = conversations[0]
    prompt = example.prompt_messages()
    print(f"\nexample (held out): {prompt[-1].content}" + (f" [{prompt[-1].context}]" if prompt[-1].context else ""))
    config = SamplingConfig(max_new_tokens=200, temperature=0.0)
    with torch.no_grad():
        reply = "".join(stream_reply(checkpoint.model, checkpoint.tokenizer, template, prompt, config))
    print(f"model:     {reply.strip()}")
    print(f"reference: {example.response}")
