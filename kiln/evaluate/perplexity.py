"""Val loss, perplexity and bits per byte of a model on a text, every token scored exactly once.

The text is cut into windows of the model's context. Without a stride the windows do not overlap, so
a token early in a window sees little context; with a stride, each window moves on by `stride` tokens
and scores only its last `stride`, so every token is predicted from at least block_size - stride
tokens before it (the sliding window of transformers' perplexity guide): slower, and closer to the
model's real quality.

Bits per byte divides the total information by the UTF-8 bytes of the text, so models with different
tokenizers compare fairly (nats per token do not: a larger vocabulary puts more text in each token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kiln.data.tokenizers import Tokenizer
from kiln.errors import ConfigError, DataError
from kiln.model.gpt import GPT, IGNORE
from kiln.progress import progress_bar


@dataclass
class CorpusMetrics:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens spell
    loss: float  # mean cross-entropy, nats per token
    perplexity: float  # exp(loss)
    bits_per_byte: float  # total nats / ln 2 / bytes

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_metrics(
    model: GPT,
    tokenizer: Tokenizer,
    text: str | Sequence[str],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> CorpusMetrics:
    """Score `text` (one string, or documents that are joined with EOS between them as `kiln prepare`
    joins them) with windows of `block_size` tokens (default: the model's context) moving by `stride`
    (default: `block_size`, no overlap).

    With an EOS token, the text is scored after an EOS that stands for "start of text", so its first
    token counts too; without one, the first token is only context, and its bytes are left out.
    """
    documents = [text] if isinstance(text, str) else list(text)
    ids = _join(documents, tokenizer)
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    if tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id, *ids]
    elif ids:
        text_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return _metrics(model, ids, text_bytes, block_size, stride, batch_size)


def token_metrics(
    model: GPT,
    tokenizer: Tokenizer,
    ids: Sequence[int],
    block_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> CorpusMetrics:
    """Score tokens as they are (a prepared split): ids[1:], each after what precedes it; ids[0] is only
    context. Bytes are those the scored tokens spell, EOS tokens spelling none."""
    ids = np.asarray(ids, dtype=np.int64)
    text_bytes = len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
    if tokenizer.eos_id is not None:
        eos_bytes = len(tokenizer.decode([tokenizer.eos_id]).encode("utf-8"))
        text_bytes -= int((ids[1:] == tokenizer.eos_id).sum()) * eos_bytes
    return _metrics(model, ids, text_bytes, block_size, stride, batch_size)


def _metrics(
    model: GPT, ids: Sequence[int], text_bytes: int, block_size: int | None, stride: int | None, batch_size: int
) -> CorpusMetrics:
    block_size = block_size or model.config.block_size
    stride = stride or block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ConfigError(
            f"block_size {block_size} must be between 1 and the model's context of {model.config.block_size}"
        )
    if not 1 <= stride <= block_size:
        raise ConfigError(f"stride {stride} must be between 1 and the window of {block_size} tokens")
    if len(ids) < 2:
        raise DataError("the text is too short to score: it needs at least one token after the first")
    nats = _score(model, torch.as_tensor(np.asarray(ids, dtype=np.int64)), block_size, stride, batch_size)
    tokens = len(ids) - 1
    loss = nats / tokens
    return CorpusMetrics(
        tokens=tokens,
        bytes=text_bytes,
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=nats / math.log(2) / max(text_bytes, 1),
    )


def _join(documents: list[str], tokenizer: Tokenizer) -> list[int]:
    arrays = tokenizer.encode_to_arrays(documents)
    ids: list[int] = []
    for number, array in enumerate(arrays):
        if number and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        ids += array.tolist()
    return ids


def _windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first_scored, end) per window over ids[0:n]: inputs ids[start:end-1] predict ids[start+1:end],
    and of those only the targets from index first_scored on count. Targets 1..n-1 are each scored once."""
    windows = []
    first = 1
    while first < n:
        end = min(first + stride, n)
        windows.append((max(0, end - 1 - block_size), first, end))
        first = end
    return windows


@torch.no_grad()
def _score(model: GPT, ids: torch.Tensor, block_size: int, stride: int, batch_size: int) -> float:
    """Total cross-entropy in nats of ids[1:], each predicted from the window that scores it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = _windows(len(ids), block_size, stride)
    total = 0.0
    with progress_bar("scoring", total=len(ids) - 1, unit="tokens") as advance:
        for at in range(0, len(windows), batch_size):
            batch = windows[at : at + batch_size]
            longest = max(end - 1 - start for start, _, end in batch)
            # Padding sits to the right of every real token, so causal attention never lets it be seen.
            inputs = torch.zeros(len(batch), longest, dtype=torch.long)
            targets = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
            for row, (start, first, end) in enumerate(batch):
                inputs[row, : end - 1 - start] = ids[start : end - 1]
                targets[row, first - 1 - start : end - 1 - start] = ids[first:end]
            logits, _ = model(inputs.to(device))
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), targets.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            advance(sum(end - first for _, first, end in batch))
    model.train(was_training)
    return total
