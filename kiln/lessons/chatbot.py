"""Lesson 5: your chatbot.

Everything through the package: pretrain a small character-level model on Tiny Shakespeare, look at
the instruction data and the Alpaca template, see what LoRA adds to one weight, fine-tune the model
with LoRA on the instructions, compare a held-out answer before and after, look inside the trained
adapter (its update has rank at most r, and merging it changes nothing the model computes), and chat.
It is the demo's path (`make demo`) made small enough to run in about a minute; the demo's own recipe
(English BPE text, a larger preset, full fine-tuning) is named where the answers are compared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from rich.markup import escape

from kiln.checkpoint import load_checkpoint
from kiln.data.corpus import open_corpus
from kiln.data.instructions import Conversation, InstructionData, instruction_file, load_instructions
from kiln.data.prepare import prepare_corpus
from kiln.data.templates import Template, get_template
from kiln.data.tokenizers import EOS, Tokenizer
from kiln.demo import DEMO_PRESET
from kiln.finetune.run import finetune_and_report, prepare_vocabulary
from kiln.finetune.sft import FinetuneConfig
from kiln.generate.chat import CHAT_SAMPLING, STOPS, ChatSession, run_script
from kiln.generate.sampling import SamplingConfig, stream_reply
from kiln.lessons.catalog import LessonContext
from kiln.lessons.narrate import Narrator
from kiln.lessons.text import lesson_text
from kiln.model.gpt import GPT
from kiln.model.lora import LoraSettings, add_lora, count_parameters, load_lora, merge_lora
from kiln.train.run import train_and_report
from kiln.train.trainer import METRICS_FILE

DEFAULT_TEXT = "tinyshakespeare"
MIN_CHARS = 20_000  # its tenth held out for val must still hold windows of 64 characters
PRESET = "shakespeare-cpu"
PRETRAIN_STEPS = {False: 600, True: 30}  # keyed by context.quick
INSTRUCTIONS = "instruction-data"
QUICK_RECORDS = 200  # quick runs fine-tune on the first 200 records only (170 train, 20 val, 10 test)
LORA = LoraSettings(r=8, alpha=16.0, dropout=0.05, targets="all")
CONTEXT = 512  # RoPE lets the 64-character pretraining context stretch to hold a whole Alpaca prompt
FINETUNE_STEPS = {False: 120, True: 8}  # 120 steps of 8: about one pass over the 935 training examples
FINETUNE_EVAL_EVERY = {False: 60, True: 8}
SHOWN_LAYER = "blocks.0.attn.qkv"  # the weight the lesson opens up: the first block's fused q/k/v projection
ADAPTER = "default"  # peft's name for the one adapter a model has unless told otherwise
ANSWER_TOKENS = {False: 120, True: 30}
CHAT_SCRIPT = (
    "Give me a word that means the same as 'quick'.",
    "What is the plural of 'mouse'?",
    "/set temperature=0",
    "Name a season of the year.",
)
CHAT_TOKENS = {False: 100, True: 20}


# ---------------------------------------------------------------- LoRA, by hand


def lora_layer(model: torch.nn.Module, name: str = SHOWN_LAYER) -> torch.nn.Module:
    """The peft layer that replaced the linear layer `name` (e.g. blocks.0.attn.qkv) of a wrapped GPT."""
    return model.get_base_model().get_submodule(name)


def lora_delta(layer: torch.nn.Module) -> torch.Tensor:
    """The update LoRA adds to the frozen weight W: scaling * B @ A, an (out x in) matrix of rank <= r.

    A is r x in and B is out x r, so every column of B @ A is a mix of B's r columns; scaling is
    alpha / r, so changing r does not change how large the update starts out.
    """
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    return layer.scaling[ADAPTER] * (b @ a)


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + scaling * B @ A: one plain weight that computes what the frozen weight and its adapter did."""
    return layer.base_layer.weight + lora_delta(layer)


def numerical_rank(matrix: torch.Tensor) -> int:
    """How many independent directions the matrix really has (singular values above float noise)."""
    # The tolerance follows the matrix's own precision: float32 products leave noise near 1e-8, not 0.
    return int(torch.linalg.matrix_rank(matrix))


# ---------------------------------------------------------------- the pieces the lesson strings together


def ready_for_instructions(base: Path, data: InstructionData, template: Template) -> tuple[GPT, Tokenizer, list[int]]:
    """The pretrained model as `kiln finetune` prepares it: the template's tokens and the data's new
    characters added to its vocabulary, and its context stretched. Returns the new token ids too."""
    checkpoint = load_checkpoint(base)
    tokenizer, new_ids = prepare_vocabulary(checkpoint.model, checkpoint.tokenizer, template, data)
    checkpoint.model.resize_context(CONTEXT)
    return checkpoint.model, tokenizer, new_ids


def answer(model: GPT, tokenizer: Tokenizer, template: Template, example: Conversation, max_new_tokens: int) -> str:
    """The model's greedy answer to an example's instruction, in the template it is prompted with."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    pieces = stream_reply(model, tokenizer, template, example.prompt_messages(), config, STOPS.get(template.name))
    return "".join(pieces).strip()


def instruction_subset(spec: str, data_dir, count: int, out_dir: Path) -> str:
    """The first `count` records of an instruction file (a JSON array), written into out_dir."""
    records = json.loads(instruction_file(spec, data_dir).read_text(encoding="utf-8"))
    path = out_dir / f"{Path(spec).stem}-first-{count}.json"
    path.write_text(json.dumps(records[:count], indent=1), encoding="utf-8")
    return str(path)


def instruction_text(example: Conversation) -> str:
    """The instruction of an example, with its input (if any) in brackets, as `kiln finetune` shows it."""
    message = example.prompt_messages()[-1]
    return message.content + (f" [{message.context}]" if message.context else "")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]


def fresh(folder: Path) -> Path:
    """This lesson's own folder from an earlier run, removed: the trainers refuse to start over a run."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


class Transcript:
    """Collects what `run_script` prints (it calls `out` the way print is called)."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, *parts: object, end: str = "\n", flush: bool = False) -> None:
        self.text += " ".join(str(part) for part in parts) + end

    @property
    def lines(self) -> list[str]:
        return self.text.rstrip("\n").splitlines()


# ---------------------------------------------------------------- the lesson, step by step


def run(context: LessonContext) -> dict:
    """Run lesson 5; returns the figures it printed."""
    say, quick = context.narrator, context.quick
    base, figures = _pretrain(say, context, PRETRAIN_STEPS[quick])
    spec = instruction_subset(INSTRUCTIONS, context.data_dir, QUICK_RECORDS, context.out_dir) if quick else INSTRUCTIONS
    data = load_instructions(spec, context.data_dir)
    template = get_template("alpaca")
    held_out = data.split(seed=FinetuneConfig().split_seed)["test"][0]  # the split `kiln finetune` makes
    figures |= _instructions(say, data, template)
    figures |= _before(say, base, data, template, held_out, ANSWER_TOKENS[quick])
    figures |= _what_lora_does(say, base, data, template)
    adapter, more = _finetune(say, context, base, spec, FINETUNE_STEPS[quick], FINETUNE_EVAL_EVERY[quick])
    figures |= more
    figures |= _after(say, adapter, template, held_out, ANSWER_TOKENS[quick], figures)
    figures |= _inside_the_adapter(say, base, adapter, data, template, held_out)
    figures |= _chat(say, adapter, CHAT_TOKENS[quick])
    return figures


def _pretrain(say: Narrator, context: LessonContext, steps: int) -> tuple[Path, dict]:
    spec = context.corpus or DEFAULT_TEXT
    lesson_text(spec, context.data_dir, MIN_CHARS)  # refuse a text too small to learn from, in one line
    say.step(f"Pretrain a small character-level model on {escape(spec)} ({steps} steps)")
    run_dir = fresh(context.out_dir / "pretrain")
    settings = {"eval_interval": max(1, steps // 2)}
    say.say(
        f"Kiln's {PRESET} preset (llama-style, 2 layers, 128 wide, context 64 characters) is the one that "
        "learns fastest on a CPU. What `kiln train` runs, as one command:\n"
        f"  kiln train --data {escape(spec)} --tokenizer char --preset {PRESET} --set eval_interval="
        f"{settings['eval_interval']} --max-iters {steps} --out {escape(str(run_dir))}"
    )
    # One folder per text: a char vocabulary is the text's own, so another text cannot reuse it.
    prepared = context.out_dir / f"pretrain-data-{Path(spec).stem}"
    data = prepare_corpus(open_corpus(spec, context.data_dir), "char", prepared)
    best = train_and_report(data, PRESET, settings, {"max_iters": steps}, run_dir)
    rows = read_metrics(run_dir)
    say.say(
        "\nIt writes text that looks like a play. Asked a question, it would carry on with more play: it has "
        "never seen a question answered."
    )
    return best, {
        "pretrain_steps": rows[-1]["step"],
        "pretrain_val_loss": min(r["val_loss"] for r in rows),
        "base": str(best),
    }


def _instructions(say: Narrator, data: InstructionData, template: Template) -> dict:
    say.step("Instruction data and the Alpaca template")
    splits = data.split(seed=FinetuneConfig().split_seed)
    say.say(
        f"{len(data.conversations):,} instructions with their answers, shuffled and cut 85/10/5 into "
        f"train {len(splits['train'])}, val {len(splits['val'])} and test {len(splits['test'])}. Each is written "
        "out with the Alpaca template; this is one training example, exactly as the model reads it:"
    )
    pieces = template.render(splits["train"][0].messages)
    rendered = "".join(piece.text if piece.special is None else piece.special for piece in pieces)
    say.say(escape(rendered))
    answer_text = "".join(p.text if p.special is None else p.special for p in pieces if p.trainable)
    say.say(
        f"Only the answer and the {escape(EOS)} after it ({len(answer_text)} of {len(rendered)} characters here) "
        "carry loss: the model learns to answer, not to write instructions. The val loss below is measured "
        "the same way: on answer characters only."
    )
    return {"examples": {name: len(split) for name, split in splits.items()}}


def _before(
    say: Narrator, base: Path, data: InstructionData, template: Template, held_out: Conversation, tokens: int
) -> dict:
    say.step("What the pretrained model answers now")
    model, tokenizer, new_ids = ready_for_instructions(base, data, template)
    say.say(
        f"Fine-tuning first adds what the template and the answers need to the vocabulary ({len(new_ids)} new "
        f"tokens: {escape(EOS)}, '#', digits, ...; {tokenizer.vocab_size} in all) and stretches the context to "
        f"{CONTEXT}. A held-out instruction, answered greedily by the pretrained model:"
    )
    before = answer(model, tokenizer, template, held_out, tokens)
    say.show("instruction", escape(instruction_text(held_out)))
    say.show("answer before fine-tuning", escape(repr(before)))
    return {"answer_before": before}


def _what_lora_does(say: Narrator, base: Path, data: InstructionData, template: Template) -> dict:
    say.step("LoRA: a small update beside a frozen weight")
    model, tokenizer, new_ids = ready_for_instructions(base, data, template)
    weight = model.get_submodule(SHOWN_LAYER).weight
    out_features, in_features = weight.shape
    r = LORA.r
    say.say(
        f"LoRA leaves every pretrained weight W as it is and learns an update beside it: W + (alpha/r) B A, with "
        f"A of shape ({r}, {in_features}) and B of shape ({out_features}, {r}). B A is a full "
        f"{out_features} x {in_features} matrix built from only r = {r} directions, so it has rank at most {r}. "
        f"B starts at zero, so at first the model computes exactly what it did before."
    )
    say.table(
        ["", "shape", "weights", "trained?"],
        [
            [f"W ({SHOWN_LAYER})", f"{out_features} x {in_features}", f"{weight.numel():,}", "no, frozen"],
            ["A", f"{r} x {in_features}", f"{r * in_features:,}", "yes"],
            ["B", f"{out_features} x {r}", f"{out_features * r:,}", "yes, starts at 0"],
        ],
    )
    ids = torch.tensor([tokenizer.encode("ROMEO:\nWhat say you?")])
    with torch.no_grad():
        plain = model.eval()(ids)[0]
        wrapped = add_lora(model, LORA, new_ids)  # peft wraps the model in place
        adapted = wrapped.eval()(ids)[0]
    zero_start = float((adapted - plain).abs().max())
    trainable, total = count_parameters(wrapped)
    adapters = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    say.show("largest change in the logits from adding the adapters (B = 0)", zero_start)
    say.say(
        f"On every weight matrix of both blocks ({LORA.targets}: q/k/v, the attention output, the MLP's up and "
        f"down), plus the embedding rows of the {len(new_ids)} new tokens, which must be learned from scratch:"
    )
    say.table(
        ["trainable", "of which adapters", "of which new token rows", "total", "share"],
        [[f"{trainable:,}", f"{adapters:,}", f"{trainable - adapters:,}", f"{total:,}", f"{trainable / total:.2%}"]],
    )
    return {"trainable": trainable, "total": total, "adapter_weights": adapters, "zero_start_change": zero_start}


def _finetune(
    say: Narrator, context: LessonContext, base: Path, spec: str, steps: int, eval_every: int
) -> tuple[Path, dict]:
    say.step(f"Fine-tune with LoRA ({steps} steps)")
    run_dir = fresh(context.out_dir / "lora")
    settings = {"block_size": CONTEXT, "max_iters": steps, "eval_interval": eval_every}
    say.say(
        "What `kiln finetune` runs, as one command:\n"
        f"  kiln finetune {escape(str(base))} --data {escape(spec)} --lora-r {LORA.r} --lora-alpha {LORA.alpha:g} "
        f"--lora-targets {LORA.targets} --set block_size={CONTEXT} --set eval_interval={eval_every} "
        f"--max-iters {steps} --out {escape(str(run_dir))}"
    )
    adapter = finetune_and_report(base, spec, run_dir, settings, LORA, data_dir=context.data_dir)
    rows = read_metrics(run_dir)
    return adapter, {
        "finetune_steps": rows[-1]["step"],
        "val_loss_before": rows[0]["val_loss"],
        "val_loss_after": min(r["val_loss"] for r in rows),
        "adapter": str(adapter),
    }


def _after(
    say: Narrator, adapter: Path, template: Template, held_out: Conversation, tokens: int, figures: dict
) -> dict:
    say.step("Before and after")
    say.show("val answer loss before", f"{figures['val_loss_before']:.4f} nats per character")
    say.show("val answer loss after", f"{figures['val_loss_after']:.4f}")
    checkpoint = load_checkpoint(adapter)  # an adapter folder loads as its base with the adapter merged in
    after = answer(checkpoint.model, checkpoint.tokenizer, template, held_out, tokens)
    say.table(
        ["", escape(instruction_text(held_out))],
        [
            ["before", escape(repr(figures["answer_before"]))],
            ["after", escape(repr(after))],
            ["reference", escape(repr(held_out.response))],
        ],
    )
    say.say(
        "In so short a run the model picks up the form of an answer (how answers open, which words they use) "
        "well before any content. What it says stays wrong: a 0.44M-parameter model that has read a little "
        "Shakespeare knows no facts to give, and a thousand examples cannot teach them."
    )
    say.say(
        "`make demo` walks the same path with a base that reads English: a byte-level BPE trained on WikiText-2 "
        f"(with these instructions' train split mixed in), the {DEMO_PRESET} preset (1.38M parameters, with "
        "smeared keys: each attention key mixes in the one before it, so a head can find and copy a word seen "
        "earlier), and fine-tuning of every weight, which for a model this small does better than LoRA, in two "
        "stages: the examples beside word-swapped copies of them, which teach it to answer with the question's "
        "own words, then the examples alone until it knows them by heart. Its answers take the question's own "
        "form and words (\"The past tense of 'fly' is ...\") and give the facts its examples taught, asked in "
        "other words, but not facts they lack (docs/finetune.md)."
    )
    return {
        "answer_after": after,
        "reference": held_out.response,
        "instruction": instruction_text(held_out),
    }


def _inside_the_adapter(
    say: Narrator, base: Path, adapter: Path, data: InstructionData, template: Template, held_out: Conversation
) -> dict:
    say.step(f"Inside the trained adapter: {SHOWN_LAYER}")
    model, tokenizer, _ = ready_for_instructions(base, data, template)
    peft_model = load_lora(model, str(adapter)).eval()
    layer = lora_layer(peft_model)
    delta = lora_delta(layer).detach()
    singular = torch.linalg.svdvals(delta.double())
    rank = numerical_rank(delta)
    say.show(f"the update's shape and rank (r = {LORA.r})", f"{tuple(delta.shape)}, rank {rank}")
    say.show("its largest singular values", ", ".join(f"{s:.2e}" for s in singular[: LORA.r + 2].tolist()))
    relative = float(delta.norm() / layer.base_layer.weight.norm())
    say.show("size of the update against the weight, |B A| / |W|", f"{relative:.3f}")

    by_hand = merged_weight(layer).detach()
    ids = torch.tensor([tokenizer.encode("\n".join(m.content for m in held_out.prompt_messages()))])
    with torch.no_grad():
        adapted_logits = peft_model(ids)[0]
        merged = merge_lora(peft_model)  # peft's own merge: folds B A into W and removes the adapter layers
        merged_logits = merged.eval()(ids)[0]
    weight_gap = float((merged.get_submodule(SHOWN_LAYER).weight - by_hand).abs().max())
    logits_gap = float((merged_logits - adapted_logits).abs().max())
    say.show("W + (alpha/r) B A by hand against peft's merged weight, largest difference", f"{weight_gap:.1e}")
    say.show("merged model against base + adapter, largest logit difference", f"{logits_gap:.1e}")
    say.say(
        "Merged, the adapter costs nothing at inference: the model is the same size and shape as before. Kept "
        "apart, it is a small file (the adapter folder) that can be swapped on and off one base."
    )
    return {
        "delta_rank": rank,
        "delta_singular_values": singular[: LORA.r + 2].tolist(),
        "delta_relative_size": relative,
        "merge_weight_gap": weight_gap,
        "merge_logits_gap": logits_gap,
    }


def _chat(say: Narrator, adapter: Path, tokens: int) -> dict:
    say.step("A short chat")
    sampling = SamplingConfig(**{**CHAT_SAMPLING, "max_new_tokens": tokens}, seed=0)
    say.say(
        "kiln.generate.chat keeps the conversation, writes it out in the Alpaca template and samples each answer "
        "(temperature 0.6, top-k 50, top-p 0.9; `/set temperature=0` switches to greedy). It samples only words "
        "the model has read (counted when its text was prepared, in the tokenizer's words.txt) or the "
        "conversation holds, so a word is never made up piece by piece (`/set known_words=false` lets it). "
        f"`kiln chat {escape(str(adapter))}` is the same with you typing:"
    )
    session = ChatSession.from_checkpoint(adapter, sampling=sampling)
    transcript = Transcript()
    run_script(session, CHAT_SCRIPT, out=transcript)
    for line in transcript.lines:
        say.say(escape(line))
    return {"chat": transcript.lines}
