"""What the machine can do: device choice, whether bf16 pays off, thread count, and peak FLOP/s for MFU.

Every stage that runs a model (train, finetune, sample, chat, evaluate, serve) picks its device here.

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

from kiln.errors import KilnError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
# bf16 autocast on a CPU pays only once the matrix products are wide enough for AMX / AVX-512 BF16 to
# outrun fp32: at nanoGPT's 128-wide shape bf16 ran 15% slower, at GPT-2's 768 several times faster.
BF16_MIN_WIDTH_CPU = 256
# AMX's tiles pay from 128 wide when a micro-batch holds many tokens (pretraining's full windows): a
# training step at 128 wide took 0.66x fp32's time at 16 x 256 tokens and 0.75x at 8 x 256, but 1.10x at
# 8 x 64 (2-core Xeon). AVX-512 BF16 without AMX took 1.13-1.15x at both large sizes, so it keeps 256.
AMX_BF16_MIN_WIDTH = 128
AMX_BF16_MIN_TOKENS = 2048


class DeviceError(KilnError):
    """A device that is not on this machine, or a name that is not a device."""


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


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must be on this machine (DeviceError)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a device; choose {DEVICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name}: this machine has no CUDA GPU (or this torch build has no CUDA); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
        return device
    raise DeviceError(f"--device {name}: Kiln runs on {DEVICES}")


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


def autocast_dtype(
    precision: str, device: torch.device, width: int | None = None, batch_tokens: int | None = None
) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto, fp32, bf16) on `device` for a model `width` wide whose
    micro-batches hold `batch_tokens` tokens (when every row is a full window; else None); None means
    plain fp32. See `precision_reason` for the rule `auto` follows."""
    return _precision_choice(precision, device, width, batch_tokens)[0]


def precision_reason(
    precision: str, device: torch.device, width: int | None = None, batch_tokens: int | None = None
) -> str:
    """What `autocast_dtype` chose and why, in a few words, for the run's opening lines."""
    dtype, why = _precision_choice(precision, device, width, batch_tokens)
    return f"{'bf16 autocast' if dtype else 'fp32'} ({why})"


def _precision_choice(
    precision: str, device: torch.device, width: int | None, batch_tokens: int | None = None
) -> tuple[torch.dtype | None, str]:
    if precision == "fp32":
        return None, "asked for"
    if precision == "bf16":
        return torch.bfloat16, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "the GPU has bf16 tensor cores"
        return None, "this GPU has no bf16"
    if device.type != "cpu":
        return None, f"auto on {device.type}"
    if not cpu_has_fast_bf16():
        return None, "this CPU has no AMX / AVX-512 BF16, so bf16 would be emulated and slower"
    if width is not None and width < BF16_MIN_WIDTH_CPU:
        amx = "amx_bf16" in cpu_flags() and width >= AMX_BF16_MIN_WIDTH
        if amx and batch_tokens and batch_tokens >= AMX_BF16_MIN_TOKENS:
            return torch.bfloat16, f"the CPU has AMX and a micro-batch holds {batch_tokens:,} tokens"
        why = f"width {width} < {BF16_MIN_WIDTH_CPU}: too narrow for bf16 to pay on this CPU"
        if amx:
            why += f" at {batch_tokens:,} tokens a micro-batch" if batch_tokens else " with rows of any length"
        return None, why
    return torch.bfloat16, "the CPU has bf16 arithmetic" + (f" and the model is {width} wide" if width else "")


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
