"""The model made ready for decoding on a CPU: each linear layer's weight laid out once for a fast
matrix-vector product, in the precision asked for. (GPUs keep `nn.Linear`.)

Decoding one sequence is a chain of matrix-vector products, so its speed is the rate at which the
weights stream from memory, and the number of bytes they take (bench/decode.py, docs/bench-decode.md):

- fp32 (exact): for one sequence, the weight stored transposed, [in, out], so the product is MKL's
  row-times-matrix (`addmm`, as transformers' GPT-2 Conv1D computes it), which streams the weight
  faster than `nn.Linear`'s dot products against [out, in] rows (29 ms against 36 ms for the 124M
  model's weights on one thread here). For several rows at once (`rows` > 1), oneDNN's prepacked
  product, which does 8 rows in 54 ms where addmm takes 75. The same products up to float rounding
  (logits within 1e-5).
- fp16: the weights stored in fp16 (half the bytes), widened to fp32 inside fbgemm's product, with fp32
  activations and sums. fp16 keeps 11 bits of each weight, so logits move by about 1e-4; on x86 this is
  both the fastest and the closest to fp32 of the halves.
- bf16: oneDNN's prepacked bf16 product (the one torch.compile uses for frozen weights; activations
  rounded to bf16 for it). bf16 keeps 8 bits, so logits move by about 1e-2, and greedy text parts from
  fp32's sooner.
Off the CPU, fp16 and bf16 cast the whole model and fp32 leaves it as it is.

`auto`, the default of `kiln sample` and `kiln chat`, picks fp16 on x86 CPUs once the weights are too
big to stay in the CPU's caches (there, halving the bytes streamed per token is what makes decoding
faster: 2.4x transformers' fp32 `generate` at 124M, the same greedy text), and fp32 elsewhere: for
models small enough that their weights stay in cache, and off the CPU. A batch of `BF16_MIN_ROWS` rows
or more (`kiln sample --num-samples 8`) is bound by arithmetic rather than by streaming the weights, so
on CPUs with bf16 arithmetic (AVX-512 BF16, AMX) `auto` picks bf16 for it, whose products run about
twice as fast there: its rows then part from single fp16 runs of the same seeds after some tokens, and
`--precision fp16` keeps them equal.

A packed model is for inference only: it has no gradients, and its state_dict no longer holds the
linear layers' weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.device import cpu_has_fast_bf16
from kiln.errors import ConfigError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FP16_MAX = 65504.0  # the largest fp16 number: fbgemm would clip a weight beyond it
# Below this many bytes of fp32 linear weights decoding is bound by the work between the products,
# not by streaming the weights, and fp16's widening costs more than its bytes save. Measured on one
# thread here, fp16 against fp32: 0.70x at 1.6 MB (shakespeare-cpu), 1.13x at 16 MB (4/4/256, vocabulary
# 4,096), 1.6-2.0x from 26 MB to 470 MB (124M).
FP16_MIN_BYTES = 8 * 2**20
# From this many rows a batch's products are bound by arithmetic. The 124M model on one thread of an
# AVX-512 BF16 CPU, bf16 against fp16 tokens/s: 0.66x at 1 row, 0.63x at 2, 1.02x at 4, 1.18x at 8.
BF16_MIN_ROWS = 8


def onednn_available(device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear runs on CPUs, in torch builds with oneDNN (mkldnn). Its bf16 product also
    needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU it raises instead of emulating."""
    return (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and (dtype != torch.bfloat16 or _onednn_bf16_supported())
    )


def _onednn_bf16_supported() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def fbgemm_available(device: torch.device | str) -> bool:
    """fbgemm's fp16-weight product runs on x86 CPUs."""
    return (
        torch.device(device).type == "cpu"
        and "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_prepack_fp16")
    )


class PackedLinear(nn.Module):
    """`nn.Linear`'s product with the weight prepacked once for oneDNN, in `dtype`, laid out for `rows`
    rows at a time (any number works); fp32 in, fp32 out."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, rows: int = 1):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class TransposedLinear(nn.Module):
    """`nn.Linear`'s product from the weight stored [in, out]: x @ W^T as a row times a matrix."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = linear.weight.detach().t().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)


class Fp16Linear(nn.Module):
    """`nn.Linear`'s product with the weight stored in fp16 and widened to fp32 inside fbgemm's kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self.packed)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) of every plain `nn.Linear` in `model`."""
    children = [(module, name, child) for module in model.modules() for name, child in module.named_children()]
    return [(module, name, child) for module, name, child in children if type(child) is nn.Linear]


def _largest_weight(linears: list[tuple[nn.Module, str, nn.Linear]]) -> float:
    return max(float(child.weight.detach().abs().max()) for _, _, child in linears)


def decoding_precision(model: nn.Module, rows: int = 1) -> tuple[str, str]:
    """The precision `auto` decodes `model` in (fp16, bf16 or fp32) `rows` sequences at a time, and why
    in a few words."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return "fp32", f"{device.type} keeps fp32"
    if not fbgemm_available(device):
        return "fp32", "this CPU has no fbgemm fp16 product"
    linears = _linears(model)
    if sum(child.weight.numel() for _, _, child in linears) * 4 < FP16_MIN_BYTES:
        return "fp32", "the weights fit in cache"
    if rows >= BF16_MIN_ROWS and cpu_has_fast_bf16() and onednn_available(device, torch.bfloat16):
        why = f"{rows} rows are bound by arithmetic, which bf16 does faster here"
        return "bf16", f"{why}; --precision fp16 for rows equal to single runs"
    if _largest_weight(linears) > FP16_MAX:
        return "fp32", "a weight is past fp16's range"
    return "fp16", "half the bytes to stream per token; --precision fp32 for exact"


@torch.no_grad()
def pack_for_decoding(model: nn.Module, precision: str = "auto", rows: int = 1) -> nn.Module:
    """Make `model` (in place; returned too) an inference model whose linear layers run in `precision`
    (auto, fp32, fp16, bf16; see the module's note), laid out for decoding `rows` sequences at once."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = decoding_precision(model, rows)[0]
    model.eval().requires_grad_(False)
    device = next(model.parameters()).device
    linears = _linears(model)
    if device.type == "cpu" and precision == "fp32" and (rows == 1 or not onednn_available(device)):
        for module, name, child in linears:
            setattr(module, name, TransposedLinear(child))
        return model
    if precision == "fp16" and device.type == "cpu":
        if not fbgemm_available(device):
            raise ConfigError("--precision fp16 needs fbgemm (x86 CPUs), which this torch lacks; use bf16 or fp32")
        largest = _largest_weight(linears)
        if largest > FP16_MAX:
            raise ConfigError(f"a weight of {largest:.3g} is past fp16's range; use --precision bf16 or fp32")
        for module, name, child in linears:
            setattr(module, name, Fp16Linear(child))
        return model
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if not onednn_available(device, dtype):  # the whole model in dtype: torch's own (emulated) products
        return model.to(dtype)
    for module, name, child in linears:
        setattr(module, name, PackedLinear(child, dtype, rows))
    return model
