"""One GPT, configured by a dataclass: `gpt2` blocks (LayerNorm, learned positions, GELU MLP; maps onto
transformers' GPT2LMHeadModel) or `llama` blocks (RMSNorm, RoPE, SwiGLU, grouped-query attention; maps
onto LlamaForCausalLM). Attention goes through scaled_dot_product_attention.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kiln.errors import ConfigError
from kiln.model import head_loss
from kiln.model.head_loss import IGNORE  # a target the loss skips (padding, prompt tokens)
from kiln.model.kv_cache import KVCache, SlotCache

BLOCK_STYLES = ("gpt2", "llama")
# gpt2 blocks' MLP activation: exact GELU (nanoGPT's, and about 2x faster on CPU than the tanh form) or
# GPT-2's own tanh approximation (what OpenAI's weights were trained with; transformers' "gelu_new").
ACTIVATIONS = ("gelu", "gelu_tanh")
# gpt2: GPT-2's N(0, 0.02) with residual projections shrunk by depth (nanoGPT's). torch: each layer's
# PyTorch default (nn.Embedding N(0, 1), nn.Linear Kaiming-uniform), as LLMs-from-scratch's GPTModel
# has: its large fixed-looking embeddings let a small text be fitted far faster (docs/bench-pretrain.md).
INITS = ("gpt2", "torch")
RENAMED = {"tie_weights": "tie_word_embeddings"}  # settings read from configs written before a rename


@dataclass
class GPTConfig:
    """Shape of the model, named as nanoGPT and the GPT-2 paper name things."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # llama: fewer key/value heads than query heads (GQA); None = n_head
    mlp_hidden: int | None = None  # None: 4 * n_embd (gpt2), or 8/3 * n_embd rounded up to 64 (llama)
    dropout: float = 0.0
    bias: bool = True
    block_style: str = "gpt2"
    activation: str = "gelu"
    tie_word_embeddings: bool = True  # transformers' name, which peft reads too
    init: str = "gpt2"  # how fresh weights are drawn (INITS)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # Smeared keys (Olsson et al. 2022, "In-context learning and induction heads"): each head's key at
    # position t is a learned mix of the keys computed at t and t-1, so one head can find "the token after
    # an earlier copy of this one" and copy it, which a plain model needs two composed layers and many
    # more steps to learn. The demo's tiny model answers with the question's own words only with it
    # (docs/finetune.md). transformers' GPT-2 and Llama have no such keys, so such a model cannot be exported.
    smear_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:  # n_head 0 was a ZeroDivisionError below
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.block_style not in BLOCK_STYLES:
            raise ConfigError(f"block_style '{self.block_style}': choose one of {', '.join(BLOCK_STYLES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation '{self.activation}': choose one of {', '.join(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ConfigError(f"init '{self.init}': choose one of {', '.join(INITS)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if self.block_style == "gpt2" and self.kv_heads != self.n_head:
            raise ConfigError("n_kv_head (grouped-query attention) needs block_style=llama")
        if self.block_style == "llama" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size; n_embd / n_head = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.block_style == "gpt2":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        """Build from a dict (config.json, --set overrides); unknown keys get a close-name suggestion."""
        known = {f.name for f in fields(cls)}
        values = {RENAMED.get(k, k): v for k, v in values.items()}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown model setting '{key}'{hint}")
        return cls(**values)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)


class Attention(nn.Module):
    """Causal self-attention with one fused q/k/v projection; keys and values may use fewer heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        kv_dim = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.rope = config.block_style == "llama"
        # sigmoid(smear) of each key is its own position's, the rest the position before's; 0 starts at half
        self.smear = nn.Parameter(torch.zeros(self.kv_heads)) if config.smear_keys else None

    def _project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as (batch, heads, time, head_dim), rotated when the model uses RoPE."""
        return self._project_from(x, rope, None)[:3]

    def _project_from(self, x: torch.Tensor, rope, key_before: torch.Tensor | None):
        """`_project` for x that continues a sequence, and the unsmeared key of x's last position (None
        without smeared keys). `key_before` [batch, kv_heads, head_dim] is the unsmeared key of the
        position before x's first (None: x starts the sequence)."""
        B, T, _ = x.shape
        heads = self.n_head + self.kv_heads
        # Queries and keys side by side as (batch, time, heads, head_dim), so RoPE rotates both at once.
        qk, v = self.qkv(x).split([heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        qk = qk.view(B, T, heads, self.head_dim)
        last_key = None
        if self.smear is not None:
            q, k = qk.split([self.n_head, self.kv_heads], dim=2)
            last_key = k[:, -1]
            qk = torch.cat([q, self._smeared(k, key_before)], dim=2)
        if rope is not None:
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
        v = v.view(B, T, self.kv_heads, self.head_dim)
        q, k = qk.split([self.n_head, self.kv_heads], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), last_key

    def _smeared(self, k: torch.Tensor, key_before: torch.Tensor | None) -> torch.Tensor:
        """Keys [B, T, kv_heads, head_dim] each mixed with the one before it."""
        before = torch.zeros_like(k[:, :1]) if key_before is None else key_before[:, None].to(k.dtype)
        shifted = torch.cat([before, k[:, :-1]], dim=1)
        own = torch.sigmoid(self.smear).to(k.dtype)[:, None]
        return own * k + (1 - own) * shifted

    def _expand_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_heads == self.n_head:
            return k, v
        repeats = self.n_head // self.kv_heads
        return k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """Training: every position attends to itself and the ones before it."""
        q, k, v = self._project(x, rope)
        k, v = self._expand_kv(k, v)
        dropout = self.dropout if self.training else 0.0
        if dropout and q.device.type == "cpu" and torch.is_grad_enabled():
            # With dropout a CPU has no fused kernel: attention is computed whole, and autograd would keep
            # two [heads, T, T] fp32 matrices a layer (216 MB for GPT-2 small at context 256, batch 2).
            # Kept are q, k and v; backward recomputes the rest with the same dropout mask (checkpoint
            # replays the RNG), about 1% of a step.
            y = checkpoint(_causal_attention, q, k, v, dropout, use_reentrant=False)
        else:
            y = _causal_attention(q, k, v, dropout)
        return self._merge(y)

    def decode(self, x: torch.Tensor, rope, cache: KVCache, layer: int) -> torch.Tensor:
        """Inference: the new positions attend to the cached ones and to each other, causally."""
        past, T = cache.length, x.shape[1]
        q, k, v, last_key = self._project_from(x, rope, cache.key_before(layer))
        k, v = self._expand_kv(*cache.update(layer, k, v, last_key))
        # New queries sit at positions past..past+T-1 and see every key up to their own position; one
        # new query sees them all, so a step needs no mask.
        mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def decode_rows(self, x: torch.Tensor, rope, cache: SlotCache, layer: int, rows, positions) -> torch.Tensor:
        """Batched inference: row i's one new position sits at positions[i] of cache slot rows[i] and
        sees that slot's keys up to it; shorter slots are masked, so every sequence keeps its own length."""
        q, k, v, last_key = self._project_from(x, rope, cache.keys_before(layer, rows, positions))
        keys, values = cache.write(layer, rows, positions, k[:, :, 0], v[:, :, 0], last_key)
        k, v = self._expand_kv(keys, values)
        mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= positions[:, None]
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]))


def rope_tables(config: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, laid out for `rotate_half` as transformers' Llama does."""
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + head_dim/2]) of the last dimension by its position's angle:
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] as in transformers' Llama."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if not torch.is_grad_enabled():  # inference: the same kernels without autograd.Function's overhead
        return _rotate(x, cos, sin)
    return _Rope.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half(x) * sin = [x2, x1] * [-sin, sin]: one flip of the two halves and a sign on the small
    # table, instead of a negation, two slices and a concatenation of the whole tensor.
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


class _Rope(torch.autograd.Function):
    """RoPE with its backward written out. A rotation's transpose is the rotation by the opposite angle,
    so the gradient is the same three kernels with -sin; autograd of the concatenation form runs about
    twice as many passes over the activations (negation, slices, zero-filled slice gradients, adds)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class MLP(nn.Module):
    """gpt2: Linear -> GELU -> Linear.  llama: SwiGLU with a fused gate/up projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.block_style == "llama"
        self.hidden = config.hidden
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.up = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * self.hidden, bias=config.bias)
        self.down = nn.Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).split(self.hidden, dim=-1)
            return self.dropout(self.down(F.silu(gate) * up))
        return self.dropout(self.down(F.gelu(self.up(x), approximate=self.approximate)))


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, with a hand-written backward for fp32 on CPU: there torch computes RMSNorm as a chain
    of element-wise operations (and autograd differentiates each), about twice the passes over the
    activations that the formulas below need. GPUs keep torch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            if not torch.is_grad_enabled():  # inference: the same arithmetic without autograd.Function's overhead
                normed, _ = _rms_normed(x, eps)
                return normed * self.weight
            return _RMSNorm.apply(x, self.weight, eps)
        return super().forward(x)


def _rms_normed(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x), and 1 / rms(x)."""
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    rstd = mean_square.add_(eps).rsqrt_()
    return x * rstd, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        normed, rstd = _rms_normed(x, eps)
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        # y = n * w with n = x * rstd:  dL/dw = sum(g * n);  dL/dx = rstd * (g*w - n * mean(g*w*n)).
        normed, rstd, weight = ctx.saved_tensors
        grad_normed_product = grad * normed
        grad_weight = grad_normed_product.flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        mean_dot = (grad_normed_product @ weight).unsqueeze(-1).div_(-normed.shape[-1])
        grad_x = torch.addcmul(grad * weight, normed, mean_dot).mul_(rstd)
        return grad_x, grad_weight, None


def _norm(config: GPTConfig) -> nn.Module:
    if config.block_style == "llama":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1, self.attn = _norm(config), Attention(config)
        self.norm2, self.mlp = _norm(config), MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope):
        x = x + self.resid_dropout(self.attn(self.norm1(x), rope))
        return x + self.mlp(self.norm2(x))

    def decode(self, x, rope, cache: KVCache, layer: int):
        x = x + self.attn.decode(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))

    def decode_rows(self, x, rope, cache: SlotCache, layer: int, rows, positions):
        x = x + self.attn.decode_rows(self.norm1(x), rope, cache, layer, rows, positions)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The language model. `forward(idx, targets)` trains; `decode(idx, cache)` is the inference step."""

    # What peft (and transformers) look for to keep a tied output head tied to the embedding.
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.block_style == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.block_style == "llama":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.init == "gpt2":  # (torch: the layers were drawn so as they were built)
            self.apply(self._init_weights)
            # GPT-2's scaled init: residual projections shrink with depth so the residual stream stays O(1).
            for name, p in self.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the vocabulary to `vocab_size` ids (for tokens added by fine-tuning). Existing rows are
        kept; a new row starts at the mean of the old ones, so a new token begins as an average token
        rather than a random one that would dominate the softmax."""
        old = self.config.vocab_size
        if vocab_size == old:
            return
        if vocab_size < old:
            raise ConfigError(f"cannot shrink the vocabulary from {old} to {vocab_size} ids")
        weight = self.wte.weight
        grown = torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
        self.wte = nn.Embedding(vocab_size, self.config.n_embd, device=weight.device, dtype=weight.dtype)
        self.wte.weight.copy_(grown)
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=weight.device)
            self.lm_head.weight = self.wte.weight
        else:
            head = self.lm_head.weight
            self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False, device=head.device, dtype=head.dtype)
            self.lm_head.weight.copy_(torch.cat([head, head.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)]))
        self.config = replace(self.config, vocab_size=vocab_size)

    def resize_context(self, block_size: int) -> None:
        """Change the context length. RoPE models take any length (the rotation tables are recomputed;
        fine-tuning at the new length adapts the model to it); learned positions cannot grow."""
        if block_size == self.config.block_size:
            return
        if self.wpe is not None:
            if block_size > self.config.block_size:
                raise ConfigError(
                    f"block_size {block_size}: this gpt2-style model learned {self.config.block_size} positions "
                    "and cannot take more; llama-style (RoPE) models can"
                )
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].clone())
            self.wpe.num_embeddings = block_size
        self.config = replace(self.config, block_size=block_size)
        if self.wpe is None:
            cos, sin = rope_tables(self.config, block_size, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin

    def num_params(self, exclude_positions: bool = False) -> int:
        """Parameter count (a tied head counted once), optionally without the position table."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.wpe.weight.numel() if exclude_positions and self.wpe is not None else 0)

    def _embed(self, idx: torch.Tensor, start: int):
        """Token (and, for gpt2 blocks, position) embeddings from position `start`, and the RoPE tables."""
        T = idx.shape[1]
        if start + T > self.config.block_size:
            raise ConfigError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            return x + self.wpe(torch.arange(start, start + T, device=idx.device)), None
        return x, (self.rope_cos[start : start + T], self.rope_sin[start : start + T])

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        loss_sum: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The training forward: logits for every position, and the mean cross-entropy when `targets`
        are given (-100 marks a position to ignore). With `logits_at` (a bool mask shaped like `idx`) the
        head runs only where it is true, and logits are [N, vocab] in order: a loss that reads a few
        positions (fine-tuning's answers) skips most of the head over the vocabulary. With `loss_sum`
        the loss is the sum, and for a large vocabulary the logits are never kept whole (returned as
        None; kiln.model.head_loss)."""
        x, rope = self._embed(idx, 0)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        if logits_at is not None:
            x, targets = x[logits_at], None if targets is None else targets[logits_at]
        if loss_sum and targets is not None and head_loss.pays(self.config.vocab_size, x.device):
            hidden = self.norm_f(x)
            return None, head_loss.head_loss_sum(hidden.flatten(0, -2), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            logits_2d = logits.reshape(-1, logits.size(-1))
            # bf16 logits lose too much in the softmax's sum
            logits_2d = logits_2d if logits_2d.dtype == torch.float64 else logits_2d.float()
            loss = F.cross_entropy(
                logits_2d, targets.reshape(-1), ignore_index=IGNORE, reduction="sum" if loss_sum else "mean"
            )
        return logits, loss

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The inference step: `idx` continues the sequence in `cache` (a prefill, then one token at a
        time); returns its logits and leaves the new keys and values in the cache."""
        x, rope = self._embed(idx, cache.length)
        for layer, block in enumerate(self.blocks):
            x = block.decode(x, rope, cache, layer)
        cache.advance(idx.shape[1])
        return self.lm_head(self.norm_f(x))

    @torch.no_grad()
    def decode_rows(self, idx: torch.Tensor, cache: SlotCache, rows: torch.Tensor, positions: torch.Tensor):
        """One step of batched inference: token idx[i] [B, 1] continues the sequence in slot rows[i] at
        position positions[i]; returns logits [B, 1, V]. The caller advances the slots' lengths."""
        if int(positions.max()) >= self.config.block_size:
            raise ConfigError(f"position {int(positions.max())} is past block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x, rope = x + self.wpe(positions)[:, None], None
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        for layer, block in enumerate(self.blocks):
            x = block.decode_rows(x, rope, cache, layer, rows, positions)
        return self.lm_head(self.norm_f(x))
