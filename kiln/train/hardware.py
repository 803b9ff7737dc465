"""What the machine can do: device choice, whether bf16 pays off, thread count, and peak FLOP/s for MFU.

MFU (model FLOPs utilisation) is the model's arithmetic per second over the device's peak, the measure
PaLM and nanoGPT report. A CPU's peak is estimated from its vector width, cores and clock; a GPU's is
looked up by name. Where neither is known MFU is left out rather than guessed.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import torch

from kiln.model.gpt import GPT, GPTConfig

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16; V100 has no bf16
    "T4": 65.0,  # fp16
}


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: the CPUs where a bf16 matmul beats fp32 (elsewhere it is emulated, and slower)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto, fp32, bf16) on `device`; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def physical_cores() -> int:
    """Cores, not hyper-threads: a second thread on one core only slows small matrix products down."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cores = {
            (m.group(1), m.group(2))
            for m in re.finditer(r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", text, re.DOTALL)
        }
        if cores:
            return min(len(cores), len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use `threads` compute threads, or one per physical core available to this process."""
    wanted = threads or physical_cores()
    torch.set_num_threads(wanted)
    return wanted


def _cpu_ghz() -> float | None:
    for path in ("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",):
        try:
            return int(Path(path).read_text()) / 1e6
        except (OSError, ValueError):
            pass
    try:
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        return max(float(m) for m in mhz) / 1000 if mhz else None
    except OSError:
        return None


def peak_flops(device: torch.device, dtype: torch.dtype | None, threads: int) -> float | None:
    """The device's peak FLOP/s for the training dtype, or None when it cannot be told."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12 / (1 if dtype in (torch.bfloat16, torch.float16) else 2)  # fp32 via TF32
        return None
    if device.type != "cpu":
        return None
    ghz = _cpu_ghz()
    if not ghz:
        return None
    flags = cpu_flags()
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle = 1024  # one AMX tile unit: 1024 bf16 FLOP per cycle
    elif "avx512f" in flags:
        per_cycle = 64  # two 512-bit FMA units x 16 fp32 x 2
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32  # two 256-bit FMA units x 8 fp32 x 2
    else:
        return None
    return per_cycle * ghz * 1e9 * threads


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's score and mix
    products (PaLM appendix B), counting the full T x T square as PaLM and nanoGPT do."""
    with torch.device("meta"):
        params = GPT(config).num_params(exclude_positions=True)
    embedding = config.vocab_size * config.n_embd if not config.tie_word_embeddings else 0
    return 6 * (params - embedding) + 12 * config.n_layer * config.n_embd * config.block_size
