"""DPO on the demo's instruction-tuned model, before and after, measured on this machine.

    KILN_DATA_DIR=../shared/data python bench/dpo_demo_model.py [--checkpoint SFT] [--max-iters 200] [--lora-r R]

Without --checkpoint it first builds the model `make demo` ended with before issue 19 (on which the figures
in docs/finetune.md were measured): `shakespeare-cpu` pretrained on Tiny Shakespeare for 3 minutes, then
LoRA-tuned on `instruction-data` for 2 minutes (r 8, all projections, context 512; bench/demo_quality.py
builds the same model as its "before"). That model, merged into one checkpoint with its vocabulary grown
for the pairs' characters, is "before" and DPO's reference. Then DPO on
`instruction-data-with-preference` (929 train / 110 val / 55 test pairs: the same split as the
instructions): full DPO, beta 0.5, the default learning rate, 200 steps of 8 pairs (1.7 epochs), the
measured choice (docs/finetune.md). Before and after, on the held-out pairs: preference accuracy (pairs whose
reward margin against the starting model is positive) and mean reward margin, and the share of pairs
whose chosen answer the model itself finds likelier; the answer loss on the instruction test split
(so a collapse would show); and five test answers side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from demo_quality import old_demo_base, old_demo_finetune  # bench/, beside this script

from kiln.checkpoint import load_checkpoint, save_checkpoint
from kiln.data.instructions import load_instructions
from kiln.data.preferences import load_preferences
from kiln.data.templates import get_template
from kiln.demo import INSTRUCTIONS
from kiln.evaluate.responses import answer_loss, score_responses
from kiln.evaluate.run import evaluate
from kiln.finetune.run import preference_tune_and_report, prepare_vocabulary
from kiln.model.lora import LoraSettings
from kiln.train.run import format_duration

PAIRS = "instruction-data-with-preference"
SPLITS = ("test", "val")


def demo_model(out: Path) -> Path:
    """The demo's chatbot before issue 19: 3 minutes of pretraining, 2 of LoRA on the instructions."""
    return old_demo_finetune(old_demo_base(out), out / "sft")


def before_dpo(folder: Path, out: Path) -> Path:
    """The instruction-tuned model as DPO starts from it, and so its reference: an adapter merged into its
    base, and the vocabulary grown for the pairs' characters (new rows at the mean of the old ones, as
    DPO would grow it), so that the same pairs are scored before and after."""
    checkpoint = load_checkpoint(folder)
    template = get_template(checkpoint.info["template"])
    pairs = load_preferences(PAIRS).as_instructions()
    tokenizer, _ = prepare_vocabulary(checkpoint.model, checkpoint.tokenizer, template, pairs)
    info = {k: v for k, v in checkpoint.info.items() if k in ("template", "finetune")}
    return save_checkpoint(out / "before", checkpoint.model, tokenizer, info=info)


def scores(folder: Path, tests: list, shown: list) -> dict:
    """Preference figures on each held-out split, the answer loss on the instruction test split `tests`,
    and greedy answers to the pairs `shown`."""
    checkpoint = load_checkpoint(folder)
    template = get_template(checkpoint.info.get("template"))
    found = {split: evaluate(folder, PAIRS, split=split, show=False) for split in SPLITS}
    found["answer_loss"] = answer_loss(checkpoint.model, checkpoint.tokenizer, template, tests)
    found["answers"] = score_responses(checkpoint, [pair.conversations()[0] for pair in shown], max_new_tokens=150)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="an instruction-tuned checkpoint or adapter (default: build the demo's)")
    parser.add_argument("--max-iters", type=int, default=200, help="DPO steps (default 200)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank on all projections (default: full DPO)")
    parser.add_argument("--beta", type=float, default=0.5, help="DPO's beta (default 0.5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DPO settings, e.g. lr=3e-4")
    parser.add_argument("--out", default="runs/bench-dpo", help="folder for every run")
    args = parser.parse_args()
    began = time.perf_counter()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    sft = before_dpo(Path(args.checkpoint) if args.checkpoint else demo_model(out / "demo"), out)
    tests = load_instructions(INSTRUCTIONS).split()["test"]
    shown = load_preferences(PAIRS).split()["test"][:5]

    before = scores(sft, tests, shown)
    settings = dict(item.split("=", 1) for item in args.set) | {"beta": args.beta}
    settings["max_iters"] = args.max_iters
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, targets="all") if args.lora_r else None
    started = time.perf_counter()
    best = preference_tune_and_report(sft, PAIRS, out / "dpo", settings, lora)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    after = scores(best, tests, shown)

    how = f"LoRA r{args.lora_r} all" if lora else "full"
    steps = max(r["step"] for r in rows)
    print(
        f"\nDPO ({how}, beta {args.beta:g}, {', '.join(args.set) or 'default lr'}): {steps:,} steps in {seconds:.0f} s"
    )
    print(
        "\n| model | held-out pairs | preference accuracy | mean reward margin | chosen likelier "
        "| mean log-prob margin | instruction test answer loss (55) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, found in (("instruction-tuned (before)", before), (f"after DPO ({how})", after)):
        for split in SPLITS:
            r = found[split]
            reward = (
                (f"{r['preference_accuracy']:.1%}", f"{r['mean_margin']:.3f}")
                if r["reference"]
                else ("- (margins all 0)", "0")
            )
            print(
                f"| {name} | {split} ({r['pairs']}) | {reward[0]} | {reward[1]} | {r['chosen_likelier']:.1%} "
                f"| {r['mean_logprob_margin']:.2f} | {found['answer_loss']:.3f} |"
            )
    print("\nFive test answers (greedy, at most 150 characters):")
    for number, (pair, old, new) in enumerate(zip(shown, before["answers"], after["answers"], strict=True)):
        print(f"\n{number + 1}. {old['instruction']}" + (f" [{old['input']}]" if old["input"] else ""))
        print(f"   chosen:   {pair.chosen!r}")
        print(f"   rejected: {pair.rejected!r}")
        print(f"   before:   {old['response']!r}")
        print(f"   after:    {new['response']!r}")
    print(f"\nwall time, all in: {format_duration(time.perf_counter() - began)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
