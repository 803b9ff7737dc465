"""Named model shapes, listed by `kiln presets`; a preset tuned for a job also carries its recipe."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from kiln.errors import ConfigError
from kiln.model.gpt import GPTConfig


@dataclass(frozen=True)
class Preset:
    description: str
    shape: dict
    recipe: dict = field(default_factory=dict)  # optimizer / training settings; --set overrides them


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "the smallest GPT-2 people start with: 2 layers, 2 heads, 128 wide",
        dict(n_layer=2, n_head=2, n_embd=128, block_size=256),
    ),
    "nanogpt-cpu": Preset(
        "nanoGPT's documented CPU shape (4/4/128, block 64), for comparison",
        dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    ),
    # Tuned on Tiny Shakespeare (char) for 66 s on 2 cores; see docs/train.md. On a CPU a step's cost
    # grows with depth far faster than what one more layer learns in a minute, so it is shallow, and
    # llama blocks (RoPE, SwiGLU, RMSNorm) learn faster per step than gpt2 blocks at this size.
    "shakespeare-cpu": Preset(
        "Kiln's best CPU preset: the lowest val loss in a few minutes on 2 cores (llama, 2/4/128, block 64)",
        dict(block_style="llama", n_layer=2, n_head=4, n_embd=128, block_size=64, dropout=0.0),
        dict(lr=5e-3, min_lr=1e-4, warmup_iters=100, batch_size=12, eval_interval=250, eval_batches=20),
    ),
    # For about 5 minutes on 2 cores (bench/pretrain_vs_nanogpt.py's 5T budget): searched at 330 s each,
    # judged by `kiln evaluate` on best/ (the whole val split in windows of the model's context): 2/4/128
    # at block 128 1.520 (block 64: 1.534), 4/4/128 at block 128 1.517, at block 256 (batch 6) 1.544,
    # with Muon 1.559, with dropout 0.1 1.665 (8.9k tokens/s against 14.5k: a CPU has no fused attention
    # with dropout); 4/4/256 in bf16 made too few steps (1.77 at step 500 of 640). See docs/bench-pretrain.md.
    "shakespeare-cpu-long": Preset(
        "shakespeare-cpu for budgets of 5 minutes or more (llama, 4/4/128, block 128): Tiny Shakespeare val 1.493 "
        "in 8 minutes on 2 cores, bench/pretrain_vs_nanogpt.py",
        dict(block_style="llama", n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
        dict(lr=5e-3, min_lr=1e-4, warmup_iters=100, batch_size=12, eval_interval=250, eval_batches=20),
    ),
    # The demo's model (kiln demo): a byte-level BPE of 4,096 tokens on English text. Narrow and shallow,
    # because a few minutes on 2 cores are few steps: on a 2-core AVX2 CPU (fp32), 200 s of pretraining and
    # 140 s of fine-tuning gave held-out ROUGE-L 0.394 at 4/4/128 against 0.243 at 4/4/256 (192 wide, batch
    # 8: 0.336, 0.321; 128 wide at batch 8: 0.359, 0.356, with 6 layers 0.277, at lr 5e-3 0.311). Smeared
    # keys let it copy the question's words into its answers after fine-tuning, which it otherwise never
    # learns in those minutes. See docs/finetune.md.
    "chatbot-cpu": Preset(
        "the demo's chatbot: a few minutes on 2 cores of English BPE text (llama, 4/4/128, block 256, smeared keys)",
        dict(block_style="llama", n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.0, smear_keys=True),
        dict(lr=3e-3, min_lr=1e-4, warmup_iters=50, batch_size=16, eval_interval=100, eval_batches=10),
    ),
    # LLMs-from-scratch ch. 5's workload (`--data the-verdict --tokenizer gpt2 --epochs 10`): the book's
    # model (untied head, PyTorch's init: with GPT-2's init Kiln fitted the text far worse) and its lr,
    # weight decay and batch, on Kiln's schedule; see docs/bench-pretrain.md. An evaluation every 5 steps,
    # as the book's eval_freq, finds the best weights before the 18 windows are over-learnt; a run that
    # need not resume writes the weights alone (0.65 GB, not 1.95 with AdamW's state), and only when the
    # val loss improves and at the end, which keeps those evaluations cheap. No clipping, as the book.
    "lfs-124m": Preset(
        "LLMs-from-scratch ch. 5: GPT-2 small at context 256, untied, PyTorch init; for --epochs 10 on the-verdict",
        dict(n_layer=12, n_head=12, n_embd=768, block_size=256, dropout=0.1, tie_word_embeddings=False, init="torch"),
        dict(lr=5e-4, weight_decay=0.1, grad_clip=0.0, batch_size=2, eval_interval=5, eval_batches=1, resumable=False),
    ),
    "gpt2-124m": Preset(
        "GPT-2 small: 12 layers, 12 heads, 768 wide, context 1024",
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown preset '{name}': {hint}`kiln presets` lists them")
    return PRESETS[name]


def preset_config(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of preset `name`, with `overrides` (e.g. vocab_size) applied on top."""
    return GPTConfig.from_dict({**get_preset(name).shape, **overrides})
