"""Comparing a Kiln model with the transformers model exported from it or imported into it."""

from __future__ import annotations

import torch


def max_logit_gap(kiln_model, hf_model, ids: torch.Tensor) -> float:
    """Largest |difference| between the two models' logits (fp32) for the same input ids."""
    kiln_model.eval()
    hf_model.eval()
    with torch.no_grad():
        ours = kiln_model(ids)[0]
        theirs = hf_model(ids).logits[..., : ours.shape[-1]]
    return (ours - theirs).abs().max().item()


def greedy_ids(kiln_model, hf_model, prompt: list[int], steps: int = 50) -> tuple[list[int], list[int]]:
    """The next `steps` greedy tokens from Kiln's sampler and from transformers' generate."""
    from kiln.generate.sampling import SamplingConfig, generate

    ids = torch.tensor([prompt])
    ours = list(generate(kiln_model, ids, SamplingConfig(max_new_tokens=steps, temperature=0.0)))
    # Kiln's sampler, given no stop ids, goes on past EOS; so does generate without an EOS id.
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    return ours, theirs
