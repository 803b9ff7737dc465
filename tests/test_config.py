"""`--set key=value` and config files land on the right dataclass with the right type, or fail clearly."""

from __future__ import annotations

import pytest

from kiln.config import apply_settings, parse_overrides, read_config_file
from kiln.errors import ConfigError
from kiln.model.gpt import GPTConfig
from kiln.train.optim import OptimConfig


def test_overrides_reach_the_config_that_owns_each_key():
    model, optim = apply_settings(
        [GPTConfig(), OptimConfig()],
        parse_overrides(["n_layer=6", "block_style=llama", "n_kv_head=2", "lr=3e-4", "bias=false", "warmup_iters=1e2"]),
    )
    assert (model.n_layer, model.block_style, model.n_kv_head, model.bias) == (6, "llama", 2, False)
    assert (optim.lr, optim.warmup_iters) == (3e-4, 100)
    assert GPTConfig().n_layer == 12  # the originals are untouched


def test_optional_fields_take_none():
    (model,) = apply_settings([GPTConfig(n_kv_head=2, block_style="llama")], {"n_kv_head": "none"})
    assert model.n_kv_head is None


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["n_layers=6"], r"unknown setting 'n_layers' \(did you mean n_layer\?\)"),
        (["n_layer=six"], r"--set n_layer=six: expected int"),
        (["n_layer=2.5"], r"--set n_layer=2.5: expected int"),
        (["lr=fast"], r"--set lr=fast: expected float"),
        (["bias=maybe"], r"--set bias=maybe: expected bool"),
        (["n_embd=30"], r"n_embd 30 is not a multiple of n_head 12"),
    ],
)
def test_bad_settings_are_one_clear_error(pairs, message):
    with pytest.raises(ConfigError, match=message):
        apply_settings([GPTConfig(), OptimConfig()], parse_overrides(pairs))


def test_set_without_an_equals_sign():
    with pytest.raises(ConfigError, match="write it as key=value"):
        parse_overrides(["n_layer"])


def test_config_files(tmp_path):
    (tmp_path / "run.toml").write_text('n_layer = 4\nlr = 0.002\nblock_style = "llama"\n')
    (tmp_path / "run.json").write_text('{"n_head": 4}')
    (tmp_path / "bad.toml").write_text("n_layer = \n")
    model, optim = apply_settings([GPTConfig(), OptimConfig()], read_config_file(tmp_path / "run.toml"))
    assert (model.n_layer, model.block_style, optim.lr) == (4, "llama", 0.002)
    assert read_config_file(tmp_path / "run.json") == {"n_head": 4}
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        read_config_file(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="no such config file"):
        read_config_file(tmp_path / "missing.toml")
