"""Kiln's GPT <-> transformers' GPT2LMHeadModel and LlamaForCausalLM: configs and weight names.

The two sides hold the same numbers under other names and, in places, other shapes: GPT-2's Conv1D
stores a linear layer's weight transposed, and Kiln fuses what Llama keeps apart (q/k/v, gate/up).
Kiln's RoPE already uses transformers' rotate-half layout, so query and key rows copy as they are.
"""

from __future__ import annotations

import torch

from kiln.errors import ConfigError, KilnError
from kiln.model.gpt import GPT, GPTConfig

# Kiln activation name <-> transformers' (GPT-2's tanh approximation is "gelu_new" there).
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
GPT2_ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def refuse_smeared_keys(config: GPTConfig) -> None:
    """Smeared keys have no counterpart in transformers' GPT-2 or Llama, nor in llama.cpp."""
    if config.smear_keys:
        raise KilnError(
            "this model has smeared keys (smear_keys=true), which transformers and llama.cpp do not have, so it "
            "cannot be exported; use it with kiln sample, chat, serve and evaluate"
        )


def hf_config(config: GPTConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None = None):
    """The transformers config object for a Kiln model shape."""
    from transformers import GPT2Config, LlamaConfig

    refuse_smeared_keys(config)
    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if config.block_style == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.hidden,
            activation_function=GPT2_ACTIVATIONS[config.activation],
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tie_word_embeddings,
            architectures=["GPT2LMHeadModel"],
            **ids,
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        architectures=["LlamaForCausalLM"],
        **ids,
    )


def kiln_config(hf, source: str) -> GPTConfig:
    """The Kiln shape of a transformers GPT-2 or Llama config; one line naming what does not fit."""
    kind = getattr(hf, "model_type", None)
    if kind == "gpt2":
        return _from_gpt2(hf, source)
    if kind == "llama":
        return _from_llama(hf, source)
    raise ConfigError(
        f"{source}: a '{kind}' model; Kiln imports GPT-2-family (GPT2LMHeadModel) and Llama (LlamaForCausalLM) models"
    )


def _refuse(source: str, what: str) -> None:
    raise ConfigError(f"{source}: {what}, which Kiln's GPT does not have; this checkpoint cannot be imported")


def _from_gpt2(hf, source: str) -> GPTConfig:
    activation = GPT2_ACTIVATIONS_IN.get(hf.activation_function)
    if activation is None:
        _refuse(source, f"activation_function '{hf.activation_function}'")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        _refuse(source, "per-layer attention scaling (scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn)")
    if not getattr(hf, "scale_attn_weights", True):
        _refuse(source, "unscaled attention (scale_attn_weights false)")
    return GPTConfig(
        vocab_size=hf.vocab_size,
        block_size=hf.n_positions,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
        mlp_hidden=hf.n_inner or 4 * hf.n_embd,
        dropout=0.0,  # a starting point for fine-tuning; --set dropout=... turns it back on
        bias=True,
        block_style="gpt2",
        activation=activation,
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        norm_eps=hf.layer_norm_epsilon,
    )


def _rope_theta(hf, source: str) -> float:
    parameters = getattr(hf, "rope_parameters", None) or {}  # transformers 5
    scaling = getattr(hf, "rope_scaling", None) or {}  # transformers 4
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        _refuse(source, f"RoPE scaling '{rope_type}'")
    return float(parameters.get("rope_theta") or getattr(hf, "rope_theta", 10000.0))


def _from_llama(hf, source: str) -> GPTConfig:
    if hf.hidden_act != "silu":
        _refuse(source, f"hidden_act '{hf.hidden_act}'")
    if bool(hf.attention_bias) != bool(getattr(hf, "mlp_bias", False)):
        _refuse(source, "biases on the attention but not the MLP (or the other way round)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        _refuse(source, f"head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}")
    return GPTConfig(
        vocab_size=hf.vocab_size,
        block_size=hf.max_position_embeddings,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_embd=hf.hidden_size,
        n_kv_head=hf.num_key_value_heads if hf.num_key_value_heads != hf.num_attention_heads else None,
        mlp_hidden=hf.intermediate_size,
        dropout=0.0,
        bias=bool(hf.attention_bias),
        block_style="llama",
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", False),
        rope_theta=_rope_theta(hf, source),
        norm_eps=hf.rms_norm_eps,
    )


def _layer_names(config: GPTConfig, i: int) -> dict[str, str]:
    """Kiln parameter name -> transformers name, for the parts of layer i that map one to one."""
    k, h = f"blocks.{i}.", f"transformer.h.{i}." if config.block_style == "gpt2" else f"model.layers.{i}."
    if config.block_style == "gpt2":
        names = {
            "norm1": "ln_1",
            "norm2": "ln_2",
            "attn.qkv": "attn.c_attn",
            "attn.proj": "attn.c_proj",
            "mlp.up": "mlp.c_fc",
            "mlp.down": "mlp.c_proj",
        }
        return {f"{k}{a}.{p}": f"{h}{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}
    names = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight"}
    for p in ("weight", "bias") if config.bias else ("weight",):
        names[f"attn.proj.{p}"] = f"self_attn.o_proj.{p}"
        names[f"mlp.down.{p}"] = f"mlp.down_proj.{p}"
    return {k + a: h + b for a, b in names.items()}


def _top_names(config: GPTConfig) -> dict[str, str]:
    if config.block_style == "gpt2":
        names = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight"}
        return names | {f"norm_f.{p}": f"transformer.ln_f.{p}" for p in ("weight", "bias")}
    return {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}


def _one_to_one_names(config: GPTConfig) -> dict[str, str]:
    """Kiln name -> transformers name for every tensor that maps whole (the fused ones are split apart)."""
    names = _top_names(config)
    for i in range(config.n_layer):
        names |= _layer_names(config, i)
    return names


def _is_conv1d(hf_name: str) -> bool:
    """GPT-2's Conv1D layers store weight as (in, out): the transpose of nn.Linear's."""
    in_block = hf_name.startswith("transformer.h.") and (".attn." in hf_name or ".mlp." in hf_name)
    return in_block and hf_name.endswith("weight")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names and shapes (biases Kiln leaves out become zeros)."""
    config, ours = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    names = _one_to_one_names(config)
    out = {}
    for kiln_name, hf_name in names.items():
        value = ours.get(kiln_name)
        if value is None:  # a bias=False gpt2 model: GPT-2 always has biases, and zero is the same as none
            value = torch.zeros(ours[kiln_name.removesuffix("bias") + "weight"].shape[0])
        out[hf_name] = value.t().contiguous() if _is_conv1d(hf_name) else value.clone()
    if config.block_style == "llama":
        q, kv = config.n_embd, config.kv_heads * config.head_dim
        for i in range(config.n_layer):
            k, h = f"blocks.{i}.", f"model.layers.{i}."
            for p in ("weight", "bias") if config.bias else ("weight",):
                for part, value in zip(("q", "k", "v"), ours[f"{k}attn.qkv.{p}"].split([q, kv, kv]), strict=True):
                    out[f"{h}self_attn.{part}_proj.{p}"] = value.clone()
                gate, up = ours[f"{k}mlp.up.{p}"].split(config.hidden)
                out[f"{h}mlp.gate_proj.{p}"], out[f"{h}mlp.up_proj.{p}"] = gate.clone(), up.clone()
    out["lm_head.weight"] = ours["lm_head.weight"].clone()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Kiln's state dict from transformers' weights for the shape `config`."""
    names = _one_to_one_names(config)

    def take(hf_name: str) -> torch.Tensor:
        if hf_name not in hf:
            raise ConfigError(f"{source}: the weights have no '{hf_name}', which its config.json implies")
        value = hf[hf_name]
        return value.t().contiguous() if _is_conv1d(hf_name) else value

    out = {kiln_name: take(hf_name) for kiln_name, hf_name in names.items()}
    if config.block_style == "llama":
        for i in range(config.n_layer):
            k, h = f"blocks.{i}.", f"model.layers.{i}.self_attn."
            m = f"model.layers.{i}.mlp."
            for p in ("weight", "bias") if config.bias else ("weight",):
                out[f"{k}attn.qkv.{p}"] = torch.cat([take(f"{h}{part}_proj.{p}") for part in "qkv"])
                out[f"{k}mlp.up.{p}"] = torch.cat([take(f"{m}gate_proj.{p}"), take(f"{m}up_proj.{p}")])
    head = hf.get("lm_head.weight")
    out["lm_head.weight"] = out["wte.weight"] if config.tie_word_embeddings or head is None else head
    return out
