"""Instruction data: the model's greedy answers scored against the references, and the references'
own loss under the model (how likely it finds the right answers, whatever it would write itself)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kiln.checkpoint import Checkpoint
from kiln.data.instructions import Conversation
from kiln.data.templates import Template, encode_pieces, fit_to_context, get_template
from kiln.data.tokenizers import Tokenizer
from kiln.errors import ConfigError, TokenizerError
from kiln.evaluate.scores import exact_match, rouge_l
from kiln.generate.sampling import SamplingConfig, stream_text
from kiln.model.gpt import GPT, IGNORE


@dataclass
class ResponseSummary:
    examples: int
    rouge_l: float  # mean ROUGE-L F-measure
    exact_match: float  # share of answers that match exactly, after normalising

    def to_dict(self) -> dict:
        return asdict(self)


def score_responses(
    checkpoint: Checkpoint,
    conversations: list[Conversation],
    max_new_tokens: int = 256,
    limit: int | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Generate a greedy answer to each conversation's prompt with the checkpoint's template, and score
    it: one dict per example with instruction, input, reference, response, rouge_l, exact_match, source.
    `on_progress(record)` is called after each one."""
    model, tokenizer = checkpoint.model, _tokenizer(checkpoint)
    template = get_template(checkpoint.info.get("template"))
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    records = []
    for conversation in conversations[:limit]:
        prompt = conversation.prompt_messages()
        try:
            ids = encode_pieces(template.render(prompt, generation_prompt=True), tokenizer).ids
        except TokenizerError as e:
            raise TokenizerError(f"{conversation.source}: {e}") from None
        # The whole prompt, as fine-tuning showed it (cut from its start only past the context); a long
        # answer slides the window on (stream_reply instead cuts the prompt to leave room for one).
        ids = ids[-max(model.config.block_size - 1, 1) :]
        response = "".join(stream_text(model, tokenizer, ids, config)).strip()
        question = next((m for m in reversed(prompt) if m.role == "user"), None)
        record = {
            "instruction": question.content if question else "",
            "input": question.context if question else "",
            "reference": conversation.response,
            "response": response,
            "rouge_l": rouge_l(conversation.response, response),
            "exact_match": exact_match(conversation.response, response),
            "source": conversation.source,
        }
        records.append(record)
        if on_progress:
            on_progress(record)
    return records


def summarize(records: list[dict]) -> ResponseSummary:
    """Mean ROUGE-L and exact-match rate of `score_responses` records."""
    n = len(records)
    return ResponseSummary(
        examples=n,
        rouge_l=sum(r["rouge_l"] for r in records) / max(n, 1),
        exact_match=sum(r["exact_match"] for r in records) / max(n, 1),
    )


@torch.no_grad()
def answer_loss(model: GPT, tokenizer: Tokenizer, template: Template, conversations: list[Conversation]) -> float:
    """Mean cross-entropy (nats) over the reference answers' tokens, prompts given, each example cut to
    the model's context as fine-tuning cuts it: the fine-tuning val loss, on any split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for conversation in conversations:
        try:
            encoded = encode_pieces(template.render(conversation.messages), tokenizer)
        except TokenizerError as e:
            raise TokenizerError(f"{conversation.source}: {e}") from None
        inputs, labels = fit_to_context(encoded, model.config.block_size + 1).inputs_and_labels()
        scored = sum(label != IGNORE for label in labels)
        if not scored:
            continue
        logits, _ = model(torch.tensor([inputs], device=device))
        total += F.cross_entropy(
            logits[0].float(), torch.tensor(labels, device=device), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += scored
    model.train(was_training)
    return total / count if count else float("nan")


def _tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    if checkpoint.tokenizer is None:
        raise ConfigError("the checkpoint has no tokenizer/ folder, so its answers cannot be turned into text")
    return checkpoint.tokenizer
