"""Lesson 3: the parts of a transformer, written out in plain PyTorch and checked against the package's model.

Each part is a small nn.Module that does one thing the way a textbook draws it: separate query, key and
value layers per head, an explicit causal mask, a softmax, a weighted sum. The package's GPT (kiln/model/gpt.py)
computes the same thing in a faster layout (one fused q/k/v layer, heads as a batch dimension, PyTorch's
fused attention kernel). The `load_*` functions copy the package's weights into the lesson's parts, and
the lesson prints the largest difference between the two outputs at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.data.tokenizers import GPT2Tokenizer
from kiln.lessons.catalog import LessonContext
from kiln.lessons.narrate import Narrator, new_figure
from kiln.model.gpt import GPT, Attention, Block, GPTConfig

SEED = 1337
SENTENCE = "Your journey starts with one step"
LATER_WORD = " leap"  # replaces the last word to show the causal mask at work
SAME = 1e-5  # float32 sums in a different order differ by about 1e-7; anything near 1e-5 is a real difference
# gpt2-style blocks (LayerNorm, learned positions, exact GELU), small enough to read, with GPT-2's vocabulary.
CONFIG = GPTConfig(
    vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, block_style="gpt2", activation="gelu"
)

# A trace is told the name of each tensor a forward pass makes; the lesson uses one to print their shapes.
Trace = Callable[[str, torch.Tensor], None]


def ignore(name: str, tensor: torch.Tensor) -> None:
    """The trace used when nobody is watching: it records nothing."""


class ShapeLog:
    """A trace that keeps each tensor's name and shape, in order, to print as a table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.rows.append((name, tuple(tensor.shape)))


# ---------------------------------------------------------------------------------------------------------
# The parts, from scratch
# ---------------------------------------------------------------------------------------------------------


class TokenAndPositionEmbedding(nn.Module):
    """Each token id looks up a learned vector; each position looks up another; the input is their sum."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int):
        super().__init__()
        self.token_table = nn.Embedding(vocab_size, d_model)
        self.position_table = nn.Embedding(block_size, d_model)

    def forward(self, ids: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        trace("token ids", ids)
        tokens = self.token_table(ids)
        trace("token vectors", tokens)
        positions = torch.arange(ids.shape[1], device=ids.device)
        trace("positions 0..T-1", positions)
        places = self.position_table(positions)
        trace("position vectors", places)
        x = tokens + places  # (T, C) broadcasts over the batch
        trace("tokens + positions", x)
        return x


def future_mask(length: int) -> torch.Tensor:
    """True above the diagonal: row t marks the positions after t, which position t may not look at."""
    return torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)


class CausalSelfAttentionHead(nn.Module):
    """One head: every position asks a question (query), offers a label (key) and a message (value), and
    takes a weighted average of the messages of itself and the positions before it."""

    def __init__(self, d_model: int, head_size: int):
        super().__init__()
        self.query = nn.Linear(d_model, head_size)
        self.key = nn.Linear(d_model, head_size)
        self.value = nn.Linear(d_model, head_size)

    def attention_weights(self, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        """(batch, T, T): row t says how much position t takes from each position; each row sums to 1."""
        trace("input x", x)
        q, k = self.query(x), self.key(x)
        trace("queries q", q)
        trace("keys k", k)
        # Dividing by sqrt(head size) keeps the scores' spread near 1 whatever the size, so the softmax
        # starts out soft instead of picking one position.
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        trace("scores q @ k^T / sqrt(d)", scores)
        mask = future_mask(x.shape[1]).to(x.device)
        trace("future mask", mask)
        scores = scores.masked_fill(mask, float("-inf"))  # exp(-inf) = 0: the future gets no weight
        weights = torch.softmax(scores, dim=-1)
        trace("weights softmax(scores)", weights)
        return weights

    def forward(self, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        weights = self.attention_weights(x, trace)
        v = self.value(x)
        trace("values v", v)
        out = weights @ v
        trace("output weights @ v", out)
        return out


class MultiHeadAttention(nn.Module):
    """Several heads side by side, each with its own smaller size; their outputs are concatenated back to
    the model width and mixed by one output projection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.heads = nn.ModuleList(CausalSelfAttentionHead(d_model, d_model // n_heads) for _ in range(n_heads))
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        trace("input x", x)
        outputs = []
        for number, head in enumerate(self.heads, start=1):
            outputs.append(head(x))
            trace(f"head {number} output", outputs[-1])
        joined = torch.cat(outputs, dim=-1)
        trace("heads concatenated", joined)
        out = self.projection(joined)
        trace("output projection", out)
        return out


class FeedForward(nn.Module):
    """The MLP: widen each position's vector 4x, bend it with GELU, narrow it back. Positions do not mix."""

    def __init__(self, d_model: int):
        super().__init__()
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        hidden = self.up(x)
        trace("MLP: up", hidden)
        hidden = F.gelu(hidden)
        trace("MLP: GELU", hidden)
        out = self.down(hidden)
        trace("MLP: down", out)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x)). The additions (residuals) let each
    part add a correction to the running vector instead of replacing it."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        trace("input x", x)
        normed = self.norm1(x)
        trace("LayerNorm 1", normed)
        attended = self.attention(normed)
        trace("attention", attended)
        x = x + attended
        trace("x + attention", x)
        normed = self.norm2(x)
        trace("LayerNorm 2", normed)
        x = x + self.mlp(normed, trace)
        trace("x + MLP", x)
        return x


class MiniTransformer(nn.Module):
    """The whole model: embeddings, a stack of blocks, a final norm, and an output head that scores every
    vocabulary entry as the next token at every position."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_heads: int, n_layers: int):
        super().__init__()
        self.embedding = TokenAndPositionEmbedding(vocab_size, block_size, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.output_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
        trace("token ids", ids)
        x = self.embedding(ids)
        trace("embeddings", x)
        for number, block in enumerate(self.blocks, start=1):
            x = block(x)
            trace(f"after block {number}", x)
        x = self.final_norm(x)
        trace("final LayerNorm", x)
        logits = self.output_head(x)
        trace("logits", logits)
        return logits


def mini_transformer_for(config: GPTConfig) -> MiniTransformer:
    """A lesson model of the same shape as the package's GPT for `config`."""
    return MiniTransformer(config.vocab_size, config.block_size, config.n_embd, config.n_head, config.n_layer)


def fused_attention(attention: Attention, x: torch.Tensor, trace: Trace = ignore) -> torch.Tensor:
    """Multi-head attention in the package's layout, written by hand: one Linear makes the queries, keys
    and values of every head at once, and a reshape turns the heads into a batch dimension so that one
    matrix product scores all heads together."""
    B, T, C = x.shape
    n_heads, size = attention.n_head, attention.head_dim
    qkv = attention.qkv(x)
    trace("qkv = one fused Linear", qkv)
    q, k, v = qkv.split(C, dim=-1)
    trace("q (k, v alike) after split", q)
    q, k, v = (part.view(B, T, n_heads, size).transpose(1, 2) for part in (q, k, v))
    trace("q as (batch, head, T, size)", q)
    scores = q @ k.transpose(-2, -1) / math.sqrt(size)
    trace("scores, all heads", scores)
    weights = torch.softmax(scores.masked_fill(future_mask(T).to(x.device), float("-inf")), dim=-1)
    trace("weights, all heads", weights)
    out = weights @ v
    trace("outputs, all heads", out)
    joined = out.transpose(1, 2).reshape(B, T, C)  # the same as concatenating the heads along the last axis
    trace("heads side by side", joined)
    out = attention.proj(joined)
    trace("output projection", out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading the package's weights into the lesson's parts
# ---------------------------------------------------------------------------------------------------------


def copy_module(target: nn.Module, source: nn.Module) -> None:
    """Copy weights between two modules with the same parameter names (Linear, LayerNorm, Embedding)."""
    target.load_state_dict(source.state_dict())


@torch.no_grad()
def load_head(head: CausalSelfAttentionHead, attention: Attention, index: int) -> None:
    """Head `index` of the package's attention into a lesson head. The fused qkv layer's output rows are
    [all queries | all keys | all values], and within each third head h owns rows h*size .. (h+1)*size."""
    width, size = attention.n_head * attention.head_dim, attention.head_dim
    for third, layer in enumerate((head.query, head.key, head.value)):
        rows = slice(third * width + index * size, third * width + (index + 1) * size)
        layer.weight.copy_(attention.qkv.weight[rows])
        layer.bias.copy_(attention.qkv.bias[rows])


def load_multi_head(lesson: MultiHeadAttention, attention: Attention) -> None:
    """Every head, then the output projection."""
    for index, head in enumerate(lesson.heads):
        load_head(head, attention, index)
    copy_module(lesson.projection, attention.proj)


def load_block(lesson: TransformerBlock, block: Block) -> None:
    copy_module(lesson.norm1, block.norm1)
    load_multi_head(lesson.attention, block.attn)
    copy_module(lesson.norm2, block.norm2)
    copy_module(lesson.mlp.up, block.mlp.up)
    copy_module(lesson.mlp.down, block.mlp.down)


def load_embedding(lesson: TokenAndPositionEmbedding, model: GPT) -> None:
    copy_module(lesson.token_table, model.wte)
    copy_module(lesson.position_table, model.wpe)


def load_mini_transformer(lesson: MiniTransformer, model: GPT) -> None:
    """All of a gpt2-style GPT. The package ties its output head to the token table (one shared matrix);
    the lesson keeps a copy, which computes the same logits."""
    load_embedding(lesson.embedding, model)
    for ours, theirs in zip(lesson.blocks, model.blocks, strict=True):
        load_block(ours, theirs)
    copy_module(lesson.final_norm, model.norm_f)
    copy_module(lesson.output_head, model.lm_head)


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def query_layout_difference(lesson: MultiHeadAttention, attention: Attention, x: torch.Tensor) -> float:
    """How far each lesson head's queries are from that head's slice of the fused layer's output."""
    B, T, C = x.shape
    fused_queries = attention.qkv(x)[..., :C].view(B, T, attention.n_head, attention.head_dim)
    return max(largest_difference(head.query(x), fused_queries[:, :, h]) for h, head in enumerate(lesson.heads))


# ---------------------------------------------------------------------------------------------------------
# The lesson
# ---------------------------------------------------------------------------------------------------------


def build_reference(config: GPTConfig = CONFIG, seed: int = SEED) -> GPT:
    """The package's GPT with seeded random weights, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    return GPT(config).eval()


def one_head_attention(config: GPTConfig = CONFIG, seed: int = SEED) -> Attention:
    """A package Attention with a single head as wide as the model."""
    torch.manual_seed(seed)
    return Attention(replace(config, n_head=1)).eval()


def even_weights(length: int) -> torch.Tensor:
    """What a head gives when every score is equal: row t spreads 1/(t+1) over positions 0..t."""
    allowed = (~future_mask(length)).float()
    return allowed / allowed.sum(dim=-1, keepdim=True)


def show_shapes(narrator: Narrator, log: ShapeLog, title: str) -> None:
    narrator.table(["tensor", "shape"], log.rows, title=title)


def show_difference(narrator: Narrator, what: str, difference: float) -> None:
    verdict = "same" if difference < SAME else "DIFFERENT"
    narrator.show(f"largest difference, {what}", f"{difference:.2e} ({verdict})")


def plot_attention(narrator: Narrator, weights: torch.Tensor, labels: list[str]) -> Path:
    """The weight matrix as a heat-map with each value written in its cell."""
    figure, axis = new_figure(6.0, 5.0)
    image = axis.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    for row in range(len(labels)):
        for column in range(len(labels)):
            value = weights[row, column].item()
            color = "black" if value > 0.6 else "white"
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("looked at (key)")
    axis.set_ylabel("looking (query)")
    axis.set_title(f"One causal attention head, untrained (seed {SEED})")
    figure.colorbar(image, ax=axis, fraction=0.046)
    return narrator.plot(figure, "attention-weights")


def step_tokens(narrator: Narrator, tokenizer: GPT2Tokenizer) -> tuple[torch.Tensor, list[str]]:
    narrator.step("A short sentence as GPT-2 token ids")
    ids = tokenizer.encode_plain(SENTENCE)
    pieces = [tokenizer.decode([i]) for i in ids]
    narrator.table(
        ["position", "token id", "text"], [(t, i, repr(p)) for t, (i, p) in enumerate(zip(ids, pieces, strict=True))]
    )
    batch = torch.tensor([ids])
    narrator.show("ids as a batch of one", f"shape {tuple(batch.shape)} = (batch, time)")
    return batch, [piece.strip() for piece in pieces]


def step_embeddings(narrator: Narrator, model: GPT, ids: torch.Tensor, figures: dict) -> torch.Tensor:
    narrator.step("Token and position embeddings")
    embedding = TokenAndPositionEmbedding(CONFIG.vocab_size, CONFIG.block_size, CONFIG.n_embd)
    load_embedding(embedding, model)
    log = ShapeLog()
    x = embedding(ids, log)
    show_shapes(narrator, log, "embedding shapes")
    reference, _ = model._embed(ids, 0)  # the package's own embedding code, not a copy of ours
    figures["max_difference"]["embeddings"] = largest_difference(x, reference)
    show_difference(narrator, "lesson vs package embeddings", figures["max_difference"]["embeddings"])
    figures["shapes"]["embeddings"] = log.rows
    return x


def step_one_head(narrator: Narrator, x: torch.Tensor, labels: list[str], figures: dict) -> None:
    narrator.step("One causal attention head")
    attention = one_head_attention()
    head = CausalSelfAttentionHead(CONFIG.n_embd, CONFIG.n_embd)
    load_head(head, attention, 0)
    # Fresh embeddings are tiny (about 0.03 per number), which makes every score about 0 and every row even;
    # a head in a block reads normalized vectors (step 6), so this one does too.
    normed = F.layer_norm(x, (CONFIG.n_embd,))
    even = largest_difference(head.attention_weights(x)[0], even_weights(x.shape[1]))
    narrator.show("on the raw embeddings, largest gap from even rows (1, 1/2, 1/3, ...)", f"{even:.4f}")
    narrator.say("The head reads the embeddings after a LayerNorm (each vector scaled to mean 0, spread 1).")
    log = ShapeLog()
    out = head(normed, log)
    show_shapes(narrator, log, f"one head of size {CONFIG.n_embd}")
    weights = head.attention_weights(normed)[0]
    rows = [[label, *(f"{w:.3f}" for w in row.tolist())] for label, row in zip(labels, weights, strict=True)]
    narrator.table(["", *labels], rows, title="attention weights (each row looks along its columns)")
    narrator.show("row sums", ", ".join(f"{s:.4f}" for s in weights.sum(dim=-1).tolist()))
    narrator.show("weight above the diagonal (the future)", f"{weights.triu(diagonal=1).abs().max().item():.1f}")
    figures["plot"] = str(plot_attention(narrator, weights, labels))
    # A package Attention with one head is this head followed by its output projection.
    difference = largest_difference(attention.proj(out), attention(normed, None))
    figures["max_difference"]["one head"] = difference
    show_difference(narrator, "proj(lesson head) vs package one-head Attention", difference)
    figures["attention_weights"] = weights.tolist()
    figures["even_gap_raw"] = even
    figures["shapes"]["one head"] = log.rows


def step_multi_head(narrator: Narrator, model: GPT, x: torch.Tensor, figures: dict) -> None:
    narrator.step(f"Multi-head attention: {CONFIG.n_head} heads of {CONFIG.head_dim}")
    attention = model.blocks[0].attn
    lesson = MultiHeadAttention(CONFIG.n_embd, CONFIG.n_head)
    load_multi_head(lesson, attention)
    normed = model.blocks[0].norm1(x)  # what block 1's attention reads
    narrator.say("The package's first block lends its attention weights; the input is that block's LayerNorm(x).")
    log = ShapeLog()
    out = lesson(normed, log)
    show_shapes(narrator, log, "multi-head shapes")
    figures["max_difference"]["multi-head"] = largest_difference(out, attention(normed, None))
    show_difference(narrator, "lesson vs package Attention", figures["max_difference"]["multi-head"])
    figures["shapes"]["multi-head"] = log.rows

    narrator.step("The same attention, fused: one q/k/v layer and heads as a batch dimension")
    rows, inputs = attention.qkv.weight.shape
    narrator.show(
        "package qkv weight",
        f"({rows}, {inputs}): {rows} outputs = 3 (q, k, v) x {CONFIG.n_head} heads x {CONFIG.head_dim}",
    )
    figures["max_difference"]["fused queries"] = query_layout_difference(lesson, attention, normed)
    show_difference(narrator, "each head's queries vs its rows of qkv", figures["max_difference"]["fused queries"])
    log = ShapeLog()
    fused = fused_attention(attention, normed, log)
    show_shapes(narrator, log, "fused shapes")
    figures["max_difference"]["fused vs heads"] = largest_difference(fused, out)
    show_difference(narrator, "fused by hand vs heads side by side", figures["max_difference"]["fused vs heads"])
    figures["shapes"]["fused"] = log.rows


def step_block(narrator: Narrator, model: GPT, x: torch.Tensor, figures: dict) -> None:
    narrator.step("The transformer block: norm, attention, residual, norm, MLP, residual")
    lesson = TransformerBlock(CONFIG.n_embd, CONFIG.n_head)
    load_block(lesson, model.blocks[0])
    log = ShapeLog()
    out = lesson(x, log)
    show_shapes(narrator, log, "block shapes")
    narrator.show("parameters in one block", f"{sum(p.numel() for p in lesson.parameters()):,}")
    figures["max_difference"]["block"] = largest_difference(out, model.blocks[0](x, None))
    show_difference(narrator, "lesson block vs package Block", figures["max_difference"]["block"])
    figures["shapes"]["block"] = log.rows


def step_mini_transformer(narrator: Narrator, model: GPT, ids: torch.Tensor, figures: dict) -> MiniTransformer:
    narrator.step(f"The mini-transformer: {CONFIG.n_layer} blocks, then a final norm and the output head")
    lesson = mini_transformer_for(CONFIG)
    load_mini_transformer(lesson, model)
    log = ShapeLog()
    logits = lesson(ids, log)
    show_shapes(narrator, log, "model shapes")
    table = lesson.embedding.token_table.weight.numel()
    figures["parameters"] = model.num_params()
    narrator.show(
        "parameters", f"{figures['parameters']:,} ({table:,} of them the token table, shared with the output head)"
    )
    reference, _ = model(ids)
    figures["max_difference"]["mini-transformer"] = largest_difference(logits, reference)
    show_difference(narrator, "lesson logits vs package GPT", figures["max_difference"]["mini-transformer"])
    figures["shapes"]["mini-transformer"] = log.rows
    return lesson


def step_causality(
    narrator: Narrator, lesson: MiniTransformer, tokenizer: GPT2Tokenizer, ids: torch.Tensor, figures: dict
) -> None:
    narrator.step("The mask at work: change the last word, and no earlier position notices")
    changed = ids.clone()
    changed[0, -1] = tokenizer.encode_plain(LATER_WORD)[0]
    narrator.show("changed sentence", repr(tokenizer.decode(changed[0].tolist())))
    before, after = lesson(ids), lesson(changed)
    earlier = largest_difference(before[:, :-1], after[:, :-1])
    last = largest_difference(before[:, -1], after[:, -1])
    narrator.show("largest logit change at the earlier positions", f"{earlier:.1e}")
    narrator.show("largest logit change at the last position", f"{last:.1e}")
    figures["future_change"] = {"earlier": earlier, "last": last}


@torch.no_grad()
def run(context: LessonContext) -> dict:
    """Build each part from scratch, load the package's weights into it, and compare the outputs."""
    narrator = context.narrator
    figures: dict = {"sentence": SENTENCE, "max_difference": {}, "shapes": {}}
    tokenizer = GPT2Tokenizer.resolve(context.data_dir)
    ids, labels = step_tokens(narrator, tokenizer)
    figures["tokens"], figures["token_ids"] = labels, ids[0].tolist()
    model = build_reference()
    narrator.say(
        f"The package's GPT, seeded ({SEED}): {CONFIG.n_layer} gpt2-style blocks, {CONFIG.n_head} heads, "
        f"{CONFIG.n_embd} wide, GPT-2's {CONFIG.vocab_size:,} tokens. Its weights go into each part below."
    )
    x = step_embeddings(narrator, model, ids, figures)
    step_one_head(narrator, x, labels, figures)
    step_multi_head(narrator, model, x, figures)
    step_block(narrator, model, x, figures)
    lesson = step_mini_transformer(narrator, model, ids, figures)
    step_causality(narrator, lesson, tokenizer, ids, figures)
    narrator.step("Summary")
    rows = [(part, f"{difference:.2e}") for part, difference in figures["max_difference"].items()]
    narrator.table(["part", "largest difference"], rows)
    return figures
