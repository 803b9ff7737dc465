"""Device choice, bf16 policy, thread count and the FLOP counts behind MFU."""

from __future__ import annotations

import pytest
import torch

from kiln import device as hardware
from kiln.model.gpt import GPTConfig
from kiln.train.engine import flops_per_token


def test_flops_per_token_counts_each_weight_six_times_plus_attention():
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    per_layer = 4 * 128 + 3 * 128 * 128 + 3 * 128 + 128 * 128 + 128 + 128 * 512 + 512 + 512 * 128 + 128
    weights = 4 * per_layer + 65 * 128 + 2 * 128  # blocks, tied embedding/head, final LayerNorm
    assert flops_per_token(config) == 6 * weights + 12 * 4 * 128 * 64
    untied = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, tie_word_embeddings=False)
    # The untied input table is a lookup (no FLOPs); its separate head is counted.
    assert flops_per_token(untied) == flops_per_token(config)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, None),
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16"}, torch.bfloat16),
    ],
)
def test_auto_precision_uses_bf16_only_where_the_cpu_has_bf16_arithmetic(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert hardware.autocast_dtype("auto", cpu) == expected
    assert hardware.autocast_dtype("fp32", cpu) is None
    assert hardware.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_cpu_peak_follows_vector_width_cores_and_clock(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_ghz", lambda: 3.0)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.peak_flops(torch.device("cpu"), None, threads=2) == 32 * 3e9 * 2
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert hardware.peak_flops(torch.device("cpu"), None, threads=2) == 64 * 3e9 * 2
    monkeypatch.setattr(hardware, "_cpu_ghz", lambda: None)
    assert hardware.peak_flops(torch.device("cpu"), None, threads=2) is None


def test_threads_default_to_the_physical_cores_this_process_may_use():
    before = torch.get_num_threads()
    try:
        assert hardware.set_threads(1) == 1 and torch.get_num_threads() == 1
        cores = hardware.set_threads(None)
        assert 1 <= cores <= (torch.multiprocessing.cpu_count() or 1)
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


def test_auto_device_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.pick_device("auto") == torch.device("cpu")
    assert hardware.pick_device("cpu") == torch.device("cpu")


def test_auto_precision_on_a_bf16_cpu_depends_on_the_model_width(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    cpu = torch.device("cpu")
    assert hardware.autocast_dtype("auto", cpu, width=128) is None  # nanoGPT's shape: bf16 measured slower
    assert hardware.autocast_dtype("auto", cpu, width=768) == torch.bfloat16
    assert hardware.autocast_dtype("bf16", cpu, width=128) == torch.bfloat16  # asked for, given
    assert "width 128 < 256" in hardware.precision_reason("auto", cpu, width=128)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "no AMX" in hardware.precision_reason("auto", cpu, width=768)


def test_amx_takes_bf16_at_128_wide_only_for_big_micro_batches_of_full_windows(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert hardware.autocast_dtype("auto", cpu, width=128, batch_tokens=16 * 256) == torch.bfloat16
    assert "AMX and a micro-batch holds 4,096 tokens" in hardware.precision_reason("auto", cpu, 128, 16 * 256)
    assert hardware.autocast_dtype("auto", cpu, width=128, batch_tokens=8 * 64) is None  # measured slower
    assert hardware.autocast_dtype("auto", cpu, width=128) is None  # fine-tuning: rows of any length
    assert hardware.autocast_dtype("auto", cpu, width=64, batch_tokens=16 * 256) is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # AVX-512 BF16 alone
    assert hardware.autocast_dtype("auto", cpu, width=128, batch_tokens=16 * 256) is None


def test_a_device_that_is_not_here_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, says in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("mps", "MPS"), ("gpu0", "not a device")):
        with pytest.raises(hardware.DeviceError, match=says):
            hardware.pick_device(name)
