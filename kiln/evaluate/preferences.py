"""Preference pairs scored by a model: the log-probability of each answer (summed over the answer's own
tokens; prompt and padding count nothing), and from two answers' log-probabilities the margin between
them, with or without a reference model, and the share of pairs where the chosen answer wins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from kiln.data.preferences import PreferencePair, encode_pair
from kiln.data.templates import Template
from kiln.data.tokenizers import Tokenizer
from kiln.errors import DataError, TokenizerError
from kiln.model.gpt import GPT, IGNORE

TokenExample = tuple[Sequence[int], Sequence[int]]  # model inputs, next-token labels (IGNORE: not scored)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row of `labels` [B, T], the summed log-probability that `logits` [B, T, V] give the labelled
    tokens; positions labelled IGNORE (prompt, padding) add exactly nothing."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # bf16 logits lose too much in the sum
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -per_token.view(labels.shape).sum(dim=-1)


@torch.no_grad()
def sequence_logprobs(model: nn.Module, examples: Sequence[TokenExample], batch_size: int = 16) -> torch.Tensor:
    """`answer_logprobs` of every example, in eval mode, in batches padded on the right (on the CPU,
    float32, in the order given)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = pad_sequence([torch.tensor(list(i)) for i, _ in chunk], batch_first=True)
        labels = pad_sequence([torch.tensor(list(lab)) for _, lab in chunk], batch_first=True, padding_value=IGNORE)
        logits, _ = model(inputs.to(device))
        scores.append(answer_logprobs(logits, labels.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def reward_margins(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None = None,
    reference_rejected: torch.Tensor | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """DPO's implicit reward of each chosen answer less the rejected one's,
    beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))];
    without a reference, beta * [log pi(chosen) - log pi(rejected)]."""
    if reference_chosen is None or reference_rejected is None:
        return beta * (chosen - rejected)
    return beta * ((chosen - reference_chosen) - (rejected - reference_rejected))


def preference_summary(margins: torch.Tensor) -> dict[str, float]:
    """Over pairs' margins: the DPO loss -log sigmoid(margin), the mean margin, and the accuracy (the
    share of pairs with a positive margin; a tie is not a win)."""
    margins = margins.double()
    return {
        "loss": float(-F.logsigmoid(margins).mean()),
        "margin": float(margins.mean()),
        "accuracy": float((margins > 0).double().mean()),
    }


def score_pairs(
    model: GPT,
    tokenizer: Tokenizer,
    template: Template,
    pairs: list[PreferencePair],
    reference: GPT | None = None,
    beta: float = 1.0,
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    """Preference accuracy (share of pairs with a positive margin) and mean margin of `pairs`: with the
    `reference` a model was DPO-tuned from, DPO's reward margin at `beta` (and its loss); without, the
    log-probability margin. Also, in any case, the share of pairs whose chosen answer the model finds
    likelier (`chosen_likelier`) and the mean log-probability margin. Pairs the tokenizer cannot read, or
    whose answer starts past the context, are left out and counted. Returns the figures and one record
    per pair."""
    kept, unreadable, cut_off = [], 0, 0
    for pair in pairs:
        try:
            sides = encode_pair(pair, template, tokenizer, model.config.block_size)
        except TokenizerError:  # a character a char vocabulary lacks: the model gives it no probability at all
            unreadable += 1
            continue
        if sides is None:
            cut_off += 1
        else:
            kept.append((pair, sides))
    if not kept:
        raise DataError(
            f"none of the {len(pairs):,} pairs can be scored ({unreadable:,} hold characters the tokenizer lacks, "
            f"{cut_off:,} have an answer past the context of {model.config.block_size})"
        )
    answers = [[sides.chosen for _, sides in kept], [sides.rejected for _, sides in kept]]
    chosen, rejected = (sequence_logprobs(model, side, batch_size) for side in answers)
    plain = preference_summary(reward_margins(chosen, rejected))
    result = {"pairs": len(kept), "unreadable": unreadable, "cut_off": cut_off, "reference": reference is not None}
    margins = reward_margins(chosen, rejected)
    if reference is not None:
        reference_chosen, reference_rejected = (sequence_logprobs(reference, side, batch_size) for side in answers)
        margins = reward_margins(chosen, rejected, reference_chosen, reference_rejected, beta)
        result |= {"beta": beta, "dpo_loss": preference_summary(margins)["loss"]}
    summary = preference_summary(margins)
    result |= {
        "preference_accuracy": summary["accuracy"],
        "mean_margin": summary["margin"],
        "chosen_likelier": plain["accuracy"],
        "mean_logprob_margin": plain["margin"],
    }
    records = [
        {
            "instruction": pair.prompt[-1].content,
            "input": pair.prompt[-1].context,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "logprob_chosen": float(c),
            "logprob_rejected": float(r),
            "margin": float(m),
            "source": pair.source,
        }
        for (pair, _), c, r, m in zip(kept, chosen, rejected, margins, strict=True)
    ]
    return result, records
