"""Optimizer parameter groups and the learning-rate schedule's shape."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import ConfigError
from kiln.model.gpt import GPT, GPTConfig
from kiln.train.optim import OptimConfig, build_optimizers, lr_factor, parameter_groups, set_learning_rates

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def test_groups_keep_norms_biases_and_embeddings_out_of_weight_decay():
    model = GPT(GPTConfig(**SMALL))
    groups = parameter_groups(model)
    assert all(p.ndim == 2 for p in groups.hidden_matrices) and len(groups.hidden_matrices) == 2 * 4
    assert any(p is model.wte.weight for p in groups.no_decay) and any(p is model.wpe.weight for p in groups.no_decay)
    assert all(p.ndim == 1 for p in groups.no_decay if p is not model.wte.weight and p is not model.wpe.weight)
    assert groups.other_matrices == []  # the head is tied to the embedding
    counted = sum(p.numel() for g in (groups.hidden_matrices, groups.other_matrices, groups.no_decay) for p in g)
    assert counted == model.num_params()


def test_untied_head_is_decayed_but_not_given_to_muon():
    model = GPT(GPTConfig(**SMALL, tie_word_embeddings=False))
    assert [p is model.lm_head.weight for p in parameter_groups(model).other_matrices] == [True]
    muon, adamw = build_optimizers(model, OptimConfig(optimizer="muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert not any(p is model.lm_head.weight for p in muon.param_groups[0]["params"])


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_both_optimizers_learn_a_repeated_batch(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    optimizers = build_optimizers(model, OptimConfig(optimizer=name, lr=1e-2, warmup_iters=0))
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(50):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]  # memorised: about 3.9 -> below 0.1 for both


def test_cosine_schedule_shape():
    config = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay="cosine")
    factors = [lr_factor(step, 2000, config) for step in range(2100)]
    assert factors[0] == pytest.approx(1 / 101)  # nanoGPT: (it + 1) / (warmup_iters + 1)
    assert factors[99] == pytest.approx(100 / 101)
    assert factors[100] == pytest.approx(1.0)
    assert factors[1050] == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert factors[2000] == factors[2099] == pytest.approx(0.1)
    decay = factors[100:2001]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_linear_and_constant_schedules():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0, decay="linear")
    assert [lr_factor(s, 4, linear) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    constant = OptimConfig(warmup_iters=2, decay="constant")
    assert [lr_factor(s, 10, constant) for s in (0, 1, 2, 50)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1, 1]


def test_set_learning_rates_scales_every_group_from_its_base():
    model = GPT(GPTConfig(**SMALL))
    optimizers = build_optimizers(model, OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02))
    set_learning_rates(optimizers, 0.5)
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(g["lr"] == pytest.approx(5e-4) for g in optimizers[1].param_groups)


def test_bad_optimizer_settings():
    with pytest.raises(ConfigError, match="optimizer 'sgd'"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="min_lr 0.1 must be between 0 and lr 0.001"):
        OptimConfig(min_lr=0.1)


def test_fp32_muon_follows_torch_muon_and_shares_its_state():
    from kiln.train.optim import Muon

    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 48)]
    copies = [[w.clone().requires_grad_() for w in weights] for _ in range(2)]
    ours = Muon(copies[0], lr=0.02, adjust_lr_fn="match_rms_adamw", fp32_orthogonalization=True)
    reference = torch.optim.Muon(copies[1], lr=0.02, adjust_lr_fn="match_rms_adamw")  # bf16 Newton-Schulz
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((copies[0], ours), (copies[1], reference)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b, w in zip(copies[0], copies[1], weights, strict=True):
        moved = (b - w).norm()
        assert moved > 0.01
        assert (a - b).norm() < 0.02 * moved  # the same update, up to bf16 rounding
    assert ours.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    ours.load_state_dict(reference.state_dict())


def test_warmup_never_takes_more_than_a_fifth_of_a_short_run():
    config = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay="cosine")
    factors = [lr_factor(step, 40, config) for step in range(40)]  # 5 epochs of a small text
    assert factors[:8] == [pytest.approx((s + 1) / 9) for s in range(8)]
    assert factors[8] == pytest.approx(1.0) and factors[-1] > 0.1


def test_a_continued_schedule_starts_where_it_stood_and_ends_at_min_lr():
    from kiln.train.optim import continued_lr_factor

    config = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    reached = lr_factor(50, 100, config)
    factors = [continued_lr_factor(step, 300, config, (50, reached)) for step in range(50, 301)]
    assert factors[0] == pytest.approx(reached) and factors[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(factors, factors[1:], strict=False))
    assert continued_lr_factor(20, 300, config, (50, reached)) == lr_factor(20, 300, config)
