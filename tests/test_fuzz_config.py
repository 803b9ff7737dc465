"""Fuzzing settings: `--set key=value`, TOML/JSON config files and chat's /set, with wrong types, unknown
keys and weird strings. Each is taken with the field's own type or refused with a one-line ConfigError
that names the setting, never another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.config import apply_settings, parse_overrides, parse_value, read_config_file
from kiln.errors import ConfigError
from kiln.finetune.sft import FinetuneConfig
from kiln.generate.sampling import SamplingConfig
from kiln.model.gpt import GPTConfig
from kiln.train.engine import TrainConfig
from kiln.train.optim import OptimConfig

PRETRAINING = (GPTConfig, OptimConfig, TrainConfig)
FINETUNING = (FinetuneConfig, TrainConfig)
KEYS = sorted({f.name for config in (*PRETRAINING, *FINETUNING, SamplingConfig) for f in dataclasses.fields(config)})
NUMBERS = ["0", "-1", "1e3", "1.5", "1e400", "nan", "inf", "-inf", "٣", "1_000", "_", "0x10", "9" * 5000]
WORDS = ["none", "null", "None", "true", "off", "yes", "llama", "adamw", "cpu", " 7 ", "", "a\nb", "\x00", "\u2028"]
WEIRD = NUMBERS + WORDS
typed_text = st.sampled_from(WEIRD) | st.integers().map(str) | st.floats().map(str) | st.text(max_size=8)
file_values = st.recursive(  # what TOML and JSON give: numbers, booleans, text, lists and tables
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(WEIRD),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)
setting_keys = st.sampled_from(KEYS) | st.text(max_size=10)
ONE_LINE = re.compile(r"[^\n\r\u2028\u2029\x85]+")


def has_the_type(value: object, annotation: object) -> bool:
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        return type(None) in options
    wanted = next(t for t in options if t is not type(None))
    return type(value) is wanted and (wanted is not float or math.isfinite(value))


def assert_taken_or_refused(configs: tuple[type, ...], chosen: dict[str, object]) -> None:
    try:
        applied = apply_settings([config() for config in configs], chosen)
    except ConfigError as e:
        assert ONE_LINE.fullmatch(str(e)), str(e)
        assert any(key in str(e) or repr(key)[1:-1] in str(e) for key in chosen), str(e)
        return
    for config in applied:
        hints = typing.get_type_hints(type(config))
        for key in chosen.keys() & hints.keys():
            assert has_the_type(getattr(config, key), hints[key]), (key, getattr(config, key))


@settings(max_examples=300)
@given(configs=st.sampled_from([PRETRAINING, FINETUNING]), chosen=st.dictionaries(setting_keys, typed_text, max_size=3))
@example(configs=PRETRAINING, chosen={"n_head": "0"})  # was a ZeroDivisionError
@example(configs=PRETRAINING, chosen={"lr": "nan"})  # was taken, to train on nan
@example(configs=PRETRAINING, chosen={"block_style": "a\nb"})  # was an error of two lines
def test_set_overrides_are_taken_typed_or_refused(configs, chosen):
    assert_taken_or_refused(configs, chosen)


@settings(max_examples=300)
@given(
    configs=st.sampled_from([PRETRAINING, FINETUNING]), chosen=st.dictionaries(setting_keys, file_values, max_size=3)
)
@example(configs=PRETRAINING, chosen={"eval_interval": [1]})  # was a TypeError comparing a list with 1
@example(configs=PRETRAINING, chosen={"n_layer": 1.5})  # was taken as a float
@example(configs=PRETRAINING, chosen={"n_embd": None})  # was a TypeError in n_embd % n_head
def test_config_file_values_are_taken_typed_or_refused(configs, chosen):
    assert_taken_or_refused(configs, chosen)


@settings(max_examples=200)
@given(
    pairs=st.lists(st.text(max_size=12) | st.sampled_from(["n_layer=6", "=6", "lr", " lr = 3e-4 ", "a==b"]), max_size=4)
)
def test_set_pairs_split_or_are_refused(pairs):
    try:
        split = parse_overrides(pairs)
    except ConfigError as e:
        assert "key=value" in str(e)
        return
    assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in split.items())


@settings(max_examples=200)
@given(key=st.sampled_from([f.name for f in dataclasses.fields(SamplingConfig)]), text=typed_text)
@example(key="temperature", text="nan")  # was taken, and sampled from nan probabilities
def test_chat_set_values_are_typed_or_refused(key, text):
    annotation = typing.get_type_hints(SamplingConfig)[key]
    try:
        value = parse_value(key, text, annotation)
        config = SamplingConfig(**{key: value})
    except ConfigError as e:
        assert ONE_LINE.fullmatch(str(e)) and key.split("_")[0] in str(e).replace("-", "_"), str(e)
        return
    assert has_the_type(getattr(config, key), annotation)


def toml_line(key: str, value: object) -> str:
    return f"{json.dumps(key)} = {json.dumps(value)}"  # a JSON string or number is also TOML


@settings(max_examples=150)
@given(
    suffix=st.sampled_from([".toml", ".json"]),
    content=st.one_of(
        st.dictionaries(setting_keys, file_values, max_size=3).map(json.dumps),
        file_values.map(json.dumps),
        st.lists(st.sampled_from(KEYS), max_size=3).map(lambda keys: "\n".join(toml_line(k, 1) for k in keys)),
        st.text(max_size=40),
    ),
    damage=st.sampled_from(["none", "cut", "latin-1"]),
    at=st.integers(0, 100),
)
@example(suffix=".json", content="[1, 2]", damage="none", at=0)  # was an AttributeError (.items)
@example(suffix=".json", content="1" * 5000, damage="none", at=0)  # was a bare ValueError
@example(suffix=".toml", content="device = 'é'", damage="latin-1", at=0)  # was a UnicodeDecodeError
def test_config_files_read_or_are_refused(tmp_path_factory, suffix, content, damage, at):
    path = tmp_path_factory.mktemp("config") / f"run{suffix}"
    raw = content.encode("utf-8", "surrogatepass")
    raw = {"cut": raw[: at % (len(raw) + 1)], "latin-1": content.encode("latin-1", "replace")}.get(damage, raw)
    path.write_bytes(raw)
    try:
        read = read_config_file(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and ONE_LINE.fullmatch(str(e)), str(e)
        return
    assert isinstance(read, dict)
    assert_taken_or_refused(PRETRAINING, read)


@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ({"n_head": "0"}, "n_head must be at least 1, not 0"),
        ({"lr": "nan"}, r"--set lr=nan: expected a finite float"),
        ({"lr": math.inf}, r"lr = inf: expected float \(a finite one\)"),
        ({"n_layer": 1.5}, r"n_layer = 1.5: expected int"),
        ({"eval_interval": [200]}, r"eval_interval = \[200\]: expected int"),
        ({"device": "cpu\n"}, r"--set device=cpu\\n: expected text on one line"),
        ({"n_layer\n": "2"}, r"unknown setting 'n_layer\\n'"),
    ],
)
def test_what_the_fuzzer_found_is_one_clear_line(chosen, message):
    with pytest.raises(ConfigError, match=message):
        apply_settings([GPTConfig(), OptimConfig(), TrainConfig()], chosen)


def test_file_values_of_the_right_kind_are_taken():
    model, optim, train = apply_settings(
        [GPTConfig(), OptimConfig(), TrainConfig()],
        {"n_layer": 4, "warmup_iters": 1e2, "lr": 1, "bias": False, "max_time": None, "device": "cpu"},
    )
    assert (model.n_layer, optim.warmup_iters, optim.lr, model.bias, train.device) == (4, 100, 1.0, False, "cpu")
    assert type(optim.warmup_iters) is int and type(optim.lr) is float
