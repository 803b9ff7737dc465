"""The model made ready for decoding on a CPU: every linear layer's weight reordered once into oneDNN's
blocked layout, in fp32 or bf16.

Decoding one sequence is a chain of matrix-vector products, so its speed is how fast the weights stream
from memory. torch's default CPU matrix-vector product read them at about half the memory's speed here
(bench/decode.py); oneDNN's prepacked product (the one torch.compile uses for frozen weights) reads them
near full speed, and in bf16 it reads half the bytes. fp32 packing gives the same products up to float
rounding (logits within 1e-5); bf16 rounds every weight to 8 bits of mantissa, so greedy text may part
from fp32's where two tokens are nearly tied. The activations between the products stay fp32.

A packed model is for inference only: it has no gradients, and its state_dict no longer holds the
linear layers' weights.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "auto")


def packing_available(device: torch.device | str) -> bool:
    """oneDNN's packed linear runs on CPUs, in torch builds with oneDNN (mkldnn)."""
    return (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`nn.Linear`'s product with the weight prepacked for oneDNN once, in `dtype`; fp32 in, fp32 out."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        weight = linear.weight.detach().to(dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # laid out for one row at a time
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def decoding_dtype(precision: str, device: torch.device, width: int) -> torch.dtype:
    """The weights' dtype for `precision`: fp32 and bf16 as asked; auto is bf16 where device.py's rule
    says bf16 pays on this device (AMX / AVX-512 BF16 CPUs, bf16 GPUs), else fp32."""
    from kiln.device import autocast_dtype

    return autocast_dtype(precision, device, width) or torch.float32


@torch.no_grad()
def pack_for_decoding(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make `model` (in place; returned too) an inference model whose linear layers run in `dtype`: on a
    CPU with oneDNN, prepacked (see the module's note); elsewhere a bf16 model is cast to bf16 whole."""
    model.eval().requires_grad_(False)
    device = next(model.parameters()).device
    if not packing_available(device):
        return model.to(dtype) if dtype != torch.float32 else model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child, dtype))
    return model
