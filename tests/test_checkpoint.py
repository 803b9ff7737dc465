"""Checkpoints: weights, tokenizer and optimizer state round-trip exactly, saves are atomic, no pickle."""

from __future__ import annotations

import pytest
import torch

from kiln import checkpoint as checkpoint_module
from kiln.checkpoint import TrainingState, is_checkpoint, load_checkpoint, save_checkpoint
from kiln.data.tokenizers import CharTokenizer
from kiln.errors import ConfigError
from kiln.model.gpt import GPT, GPTConfig

CONFIG = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


def train_steps(model, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 40, (4, 16), generator=generator)
        _, loss = model(idx, targets=idx.roll(-1, dims=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_weights_and_tokenizer_round_trip(tmp_path, style):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, block_style=style))
    tokenizer = CharTokenizer("abcdefghij")
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, info={"note": "hello"})
    loaded = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, 40, (2, 10))
    assert torch.equal(loaded.model(idx)[0], model(idx)[0])
    assert loaded.model.lm_head.weight is loaded.model.wte.weight
    assert loaded.tokenizer.encode("cab") == [2, 0, 1]
    assert loaded.info["note"] == "hello" and loaded.state is None
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]


def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    train_steps(model, optimizer, 3, seed=1)
    state = TrainingState(optimizers=[optimizer.state_dict()], progress={"step": 3})
    save_checkpoint(tmp_path / "ckpt", model, state=state)
    train_steps(model, optimizer, 2, seed=2)

    resumed = load_checkpoint(tmp_path / "ckpt")
    resumed_optimizer = torch.optim.AdamW(resumed.model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    resumed_optimizer.load_state_dict(resumed.state.optimizers[0])
    assert resumed.state.progress == {"step": 3}
    train_steps(resumed.model, resumed_optimizer, 2, seed=2)
    for a, b in zip(model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = GPT(GPTConfig(**CONFIG))
    save_checkpoint(tmp_path / "last", first)
    second = GPT(GPTConfig(**CONFIG))

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", second, state=TrainingState(progress={"step": 1}))
    idx = torch.randint(0, 40, (1, 8))
    assert torch.equal(load_checkpoint(tmp_path / "last").model(idx)[0], first(idx)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    assert not is_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="not a Kiln checkpoint"):
        load_checkpoint(tmp_path)


def test_weights_that_disagree_with_the_config_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt", GPT(GPTConfig(**CONFIG)))
    config = (tmp_path / "ckpt" / "config.json").read_text().replace('"n_layer": 2', '"n_layer": 3')
    (tmp_path / "ckpt" / "config.json").write_text(config)
    with pytest.raises(ConfigError, match="weights do not match config.json"):
        load_checkpoint(tmp_path / "ckpt")


def test_disk_full_while_saving_is_one_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    from kiln.errors import KilnError

    torch.manual_seed(0)
    first = GPT(GPTConfig(**CONFIG))
    save_checkpoint(tmp_path / "last", first)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_model", disk_full)
    with pytest.raises(
        KilnError,
        match=r"last: could not write the checkpoint \(No space left on device\); the "
        r"previous one there is intact",
    ):
        save_checkpoint(tmp_path / "last", GPT(GPTConfig(**CONFIG)))
    idx = torch.randint(0, 40, (1, 8))
    assert torch.equal(load_checkpoint(tmp_path / "last").model(idx)[0], first(idx)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_optimizer_state_written_before_it_was_keyed_by_name_still_resumes(tmp_path):
    import json

    from safetensors.torch import save_file

    from kiln.checkpoint import STATE_JSON, STATE_TENSORS, load_training_state
    from kiln.distributed import World
    from kiln.train.parallel import load_optimizer_states

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 2, seed=1)
    saved = optimizer.state_dict()
    # The layout of the files before optimizer state was keyed by parameter name: tensors by index.
    tensors = {f"optimizer0.{i}.{k}": v for i, s in saved["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    folder = save_checkpoint(tmp_path / "old", model)
    save_file(tensors, str(folder / STATE_TENSORS))
    meta = {"param_groups": saved["param_groups"], "scalars": {}, "indices": list(saved["state"])}
    (folder / STATE_JSON).write_text(json.dumps({"optimizers": [meta], "progress": {"step": 2}}))

    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_optimizer_states(model, [fresh], load_training_state(folder).optimizers, "ddp", World())
    for index, state in saved["state"].items():
        assert torch.equal(fresh.state_dict()["state"][index]["exp_avg"], state["exp_avg"])
