"""What `kiln evaluate` does: load a checkpoint, score it on running text (loss, perplexity, bits per
byte), on instruction data (generated answers against references) or on preference pairs (which answer
it finds more likely), write the scores as JSONL beside the checkpoint, and print a summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln.atomic import atomic_file
from kiln.checkpoint import Checkpoint, is_adapter, is_checkpoint, load_checkpoint, read_info
from kiln.data.instructions import load_instructions
from kiln.data.preferences import load_preferences, preference_split
from kiln.data.templates import get_template
from kiln.device import pick_device
from kiln.errors import ConfigError
from kiln.evaluate.data import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_FRACTION,
    corpus_split,
    data_name,
    find_prepared,
    instruction_split,
    is_instruction_data,
    is_preference_data,
    prepared_split,
    reads_ids_of,
)
from kiln.evaluate.perplexity import corpus_metrics, token_metrics
from kiln.evaluate.preferences import score_pairs
from kiln.evaluate.responses import answer_loss, score_responses, summarize
from kiln.progress import progress_bar


def evaluate(
    checkpoint_path: str | os.PathLike,
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    max_new_tokens: int = 256,
    split: str | None = None,
    stride: int | None = None,
    text_field: str | None = None,
    device: str = "auto",
    base: str | os.PathLike | None = None,
    show: bool = True,
) -> dict:
    """Evaluate a checkpoint on DATA (a data-set name or a file; default: the data it was fine-tuned on)
    and return the numbers, with "output" the JSONL written (default: eval-DATA.jsonl beside the
    checkpoint folder).

    Instruction data: answers to `split` (default test) generated greedily, at most `limit` examples.
    Preference pairs: preference accuracy and margins on `split` (default test), at most `limit` pairs.
    Running text: loss, perplexity and bits per byte of `split` (default val), at most `limit` characters,
    in windows moving by `stride` tokens (default: no overlap).
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    checkpoint = load_checkpoint(checkpoint_path, pick_device(device), base)
    if checkpoint.tokenizer is None:
        raise ConfigError(f"{checkpoint_path}: has no tokenizer/ folder, so it cannot read text; give another")
    data = data if data is not None else _finetune_data(checkpoint, checkpoint_path)
    preferences = is_preference_data(data, text_field)
    instructions = preferences or is_instruction_data(data, text_field)
    split = split or ("test" if instructions else "val")
    if preferences:
        result, rows = _evaluate_preferences(checkpoint, data, data_dir, split, limit, base, device)
    elif instructions:
        result, rows = _evaluate_instructions(checkpoint, data, data_dir, split, limit, max_new_tokens)
    else:
        result = _evaluate_text(checkpoint, data, data_dir, split, limit, stride, text_field)
        rows = [{"data": str(data), "split": split, **result}]
    default_split = split == ("test" if instructions else "val")
    name = data_name(data) + ("" if default_split else f"-{split}")
    output = Path(out) if out else Path(checkpoint_path).resolve().parent / f"eval-{name}.jsonl"
    _write_jsonl(output, rows)
    result = {"checkpoint": str(checkpoint_path), "data": str(data), "split": split, **result, "output": str(output)}
    if show:
        print_summary(result)
    return result


def _finetune_data(checkpoint: Checkpoint, path: str | os.PathLike) -> str:
    data = (checkpoint.info.get("finetune") or {}).get("data")
    if not data:
        raise ConfigError(f"{path}: was not fine-tuned on instruction data; name the data to evaluate on with --data")
    return data


def _evaluate_text(
    checkpoint: Checkpoint,
    data: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    split: str,
    limit: int | None,
    stride: int | None,
    text_field: str | None,
) -> dict:
    """Loss, perplexity and bits per byte of running text: the split of the prepared corpus DATA is or
    was prepared into (the tokens training held out), else the split cut from the text, at the val
    fraction such a corpus was prepared with when its tokenizer is another."""
    prepared = find_prepared(data, checkpoint.tokenizer, _trained_on(checkpoint), data_dir, text_field)
    if prepared is not None and reads_ids_of(checkpoint.tokenizer, prepared.tokenizer):
        ids = prepared_split(prepared, split, limit)
        metrics = token_metrics(checkpoint.model, checkpoint.tokenizer, ids, stride=stride)
        return {"kind": "corpus", "prepared": str(prepared.folder), **metrics.to_dict()}
    fraction = prepared.meta["val_fraction"] if prepared is not None else None
    fraction = DEFAULT_VAL_FRACTION if fraction is None else fraction
    documents = corpus_split(data, split, data_dir, text_field, fraction, limit_chars=limit)
    metrics = corpus_metrics(checkpoint.model, checkpoint.tokenizer, documents, stride=stride)
    return {"kind": "corpus", **metrics.to_dict()}


def _trained_on(checkpoint: Checkpoint) -> list[str]:
    """The prepared folders a checkpoint, or the base it was fine-tuned from, was pretrained on."""
    base = (checkpoint.info.get("finetune") or {}).get("base")
    found = [checkpoint.info.get("data"), read_info(base).get("data") if base else None]
    return [folder for folder in found if folder]


def _evaluate_instructions(
    checkpoint: Checkpoint,
    data: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    split: str,
    limit: int | None,
    max_new_tokens: int,
) -> tuple[dict, list[dict]]:
    seed = (checkpoint.info.get("finetune") or {}).get("split_seed", DEFAULT_SPLIT_SEED)
    conversations = instruction_split(load_instructions(data, data_dir), split, seed)[:limit]
    with progress_bar(f"answering {split} examples", total=len(conversations), unit="examples") as advance:
        scored: list[dict] = []

        def show(record: dict) -> None:
            scored.append(record)
            advance(1, f"answering {split} examples, ROUGE-L so far {summarize(scored).rouge_l:.3f}")

        records = score_responses(checkpoint, conversations, max_new_tokens, on_progress=show)
    template = get_template(checkpoint.info.get("template"))
    loss = answer_loss(checkpoint.model, checkpoint.tokenizer, template, conversations)
    return {
        "kind": "instructions",
        "template": template.name,
        **summarize(records).to_dict(),
        "answer_loss": loss,
    }, records


def _evaluate_preferences(
    checkpoint: Checkpoint,
    data: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    split: str,
    limit: int | None,
    base: str | os.PathLike | None,
    device: str,
) -> tuple[dict, list[dict]]:
    """Preference accuracy and margins on `split` of preference pairs, split as DPO split them; for a
    DPO-tuned checkpoint also the implicit rewards against its reference (its base, or `base`)."""
    tuned = checkpoint.info.get("finetune") or {}
    pairs = preference_split(load_preferences(data, data_dir), split, tuned.get("split_seed", DEFAULT_SPLIT_SEED))
    reference = None
    if tuned.get("method") == "dpo":
        folder = base or tuned.get("base")
        if folder and (is_checkpoint(folder) or is_adapter(folder)):
            reference = load_checkpoint(folder, pick_device(device)).model
            # grown as DPO grew it: new vocabulary rows start at the mean of the old ones
            reference.resize_vocab(checkpoint.model.config.vocab_size)
            reference.resize_context(checkpoint.model.config.block_size)
        else:
            print(f"note: {folder}, the model DPO started from, is not there: no reward margins (name it with --base)")
    template = get_template(checkpoint.info.get("template"))
    result, records = score_pairs(
        checkpoint.model, checkpoint.tokenizer, template, pairs[:limit], reference, tuned.get("beta", 1.0)
    )
    return {"kind": "preferences", "template": template.name, **result}, records


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def print_summary(result: dict, console: Console | None = None) -> None:
    """The numbers `evaluate` returns, as a table, and where the JSONL went."""
    console = console or Console()
    checkpoint = Path(result["checkpoint"]).resolve()
    table = Table("metric", "value", box=None, pad_edge=False)
    if result["kind"] == "corpus":
        if result.get("prepared"):
            table.add_row("prepared data", result["prepared"])
        table.add_row("tokens", f"{result['tokens']:,}")
        table.add_row("bytes", f"{result['bytes']:,}")
        table.add_row("loss (nats/token)", f"{result['loss']:.4f}")
        table.add_row("perplexity", f"{result['perplexity']:.2f}")
        table.add_row("bits per byte", f"{result['bits_per_byte']:.4f}")
    elif result["kind"] == "preferences":
        table.add_row("pairs", f"{result['pairs']:,}")
        if result["unreadable"]:
            table.add_row("left out: characters the tokenizer lacks", f"{result['unreadable']:,}")
        if result["cut_off"]:
            table.add_row("left out: answer past the context", f"{result['cut_off']:,}")
        if result["reference"]:
            table.add_row("preference accuracy (reward margin > 0)", f"{result['preference_accuracy']:.1%}")
            table.add_row(f"mean reward margin (beta {result['beta']:g})", f"{result['mean_margin']:.3f}")
            table.add_row("DPO loss", f"{result['dpo_loss']:.4f}")
        likelier = "chosen answer likelier" if result["reference"] else "preference accuracy (chosen likelier)"
        table.add_row(likelier, f"{result['chosen_likelier']:.1%}")
        table.add_row("mean log-prob margin (nats)", f"{result['mean_logprob_margin']:.3f}")
        table.add_row("template", result["template"])
    else:
        table.add_row("examples", f"{result['examples']:,}")
        table.add_row("ROUGE-L (F, mean)", f"{result['rouge_l']:.4f}")
        table.add_row("exact match", f"{result['exact_match']:.1%}")
        table.add_row("answer loss (nats/token)", f"{result['answer_loss']:.4f}")
        table.add_row("template", result["template"])
    heading = f"{checkpoint.parent.name}/{checkpoint.name} on {Path(result['data']).name}, {result['split']} split"
    console.print(heading, soft_wrap=True, highlight=False)
    console.print(table)
    console.print(f"scores: {result['output']}", soft_wrap=True, highlight=False)
