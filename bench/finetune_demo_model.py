"""Full and LoRA instruction fine-tuning of the model `make demo` pretrains, measured on this machine.

    KILN_DATA_DIR=../shared/data python bench/finetune_demo_model.py [--base RUN/best] [--time 3m]

Without --base it first pretrains `shakespeare-cpu` on Tiny Shakespeare for 3 minutes, as the demo does.
Then, from the same base, on `instruction-data` (935 train / 110 val / 55 test, Alpaca template,
context stretched to 512 characters): full fine-tuning and LoRA (r 8, alpha 16, all projections), each
for --time. Every model, and the base before fine-tuning, is scored on the 55 test examples: answer loss,
ROUGE-L and exact match of greedy answers. Prints a table and five answers side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.data.instructions import load_instructions
from kiln.data.templates import get_template
from kiln.evaluate.run import evaluate
from kiln.finetune.run import finetune_and_report, prepare_vocabulary
from kiln.model.lora import LoraSettings
from kiln.train.run import parse_duration, train_and_report, training_data

DATA = "instruction-data"
SETTINGS = {"block_size": 512}
RUNS = {
    "full": (None, {}),
    "LoRA r8 all": (LoraSettings(r=8, alpha=16, dropout=0.05, targets="all"), {}),
}


def before_finetuning(base: Path, out: Path) -> Path:
    """The base as fine-tuning starts from it: vocabulary grown for the template, context stretched."""
    checkpoint = load_checkpoint(base)
    template = get_template("alpaca")
    tokenizer, _ = prepare_vocabulary(checkpoint.model, checkpoint.tokenizer, template, load_instructions(DATA))
    checkpoint.model.resize_context(SETTINGS["block_size"])
    info = {"template": template.name, "finetune": {"data": DATA, "split_seed": 123}}
    return save_checkpoint(out / "before" / "best", checkpoint.model, tokenizer, info=info)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a pretrained checkpoint (default: pretrain one for 3 minutes)")
    parser.add_argument("--time", default="3m", help="fine-tuning time per run (default 3m)")
    parser.add_argument("--out", default="runs/bench-finetune", help="folder for every run")
    args = parser.parse_args()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.base) if args.base else None
    if base is None:
        data = training_data("tinyshakespeare", "char", None)
        base = train_and_report(data, "shakespeare-cpu", {}, {"max_time": 180.0}, out / "pretrain")

    rows, answers = [], {}
    before = evaluate(before_finetuning(base, out), DATA, show=False)
    rows.append(("base, before fine-tuning", "-", "-", "-", before))
    answers["before"] = _answers(before)
    for name, (lora, settings) in RUNS.items():
        began = time.perf_counter()
        best = finetune_and_report(
            base,
            DATA,
            out / name.split()[0].lower(),
            {**SETTINGS, **settings, "max_time": parse_duration(args.time)},
            lora,
        )
        seconds = time.perf_counter() - began
        metrics = [json.loads(line) for line in (best.parent / "metrics.jsonl").read_text().splitlines()]
        result = evaluate(best, DATA, show=False)
        val = f"{metrics[0]['val_loss']:.3f} -> {min(m['val_loss'] for m in metrics):.3f}"
        rows.append((name, f"{metrics[-1]['step']:,}", f"{seconds:.0f}", val, result))
        answers[name] = _answers(result)

    print("\n| model | steps | wall s | val answer loss (110) | test answer loss (55) | ROUGE-L (55) | exact match |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, steps, seconds, val, r in rows:
        print(
            f"| {name} | {steps} | {seconds} | {val} | {r['answer_loss']:.3f} | {r['rouge_l']:.3f} "
            f"| {r['exact_match']:.1%} |"
        )
    print("\nFive test answers (greedy):")
    for number, record in enumerate(answers["before"][:5]):
        print(f"\n{number + 1}. {record['instruction']}" + (f" [{record['input']}]" if record["input"] else ""))
        print(f"   reference: {record['reference']!r}")
        for name in RUNS:
            print(f"   {name}: {answers[name][number]['response']!r}")
    return 0


def _answers(result: dict) -> list[dict]:
    return [json.loads(line) for line in Path(result["output"]).read_text().splitlines()]


if __name__ == "__main__":
    sys.exit(main())
