"""The output head and the cross-entropy as one step, a slice of rows at a time, for large vocabularies.

Plainly, the head's logits for a batch are [rows, vocab]: for GPT-2's 50,257 tokens and a batch of
2 x 256, 103 MB in fp32. Autograd keeps the bf16 logits, their fp32 copy and the log-softmax it saved
(257 MB under bf16 autocast) until backward. The loss is the last thing a training step computes, so
the gradient of a summed loss with respect to each logit is known in the forward pass: softmax minus
the one-hot target. `head_loss_sum` works through the rows a slice at a time, computing each slice's
logits, its loss, that gradient and from it the hidden states' gradient, and keeps the logits'
gradient alone, in the products' dtype (51 MB under bf16 autocast). Backward makes the head weight's
gradient from it a slice of the vocabulary at a time, straight into fp32. The same three products as
the plain head, none twice, and a few hundred MB less at the step's peak (docs/bench-pretrain.md).
"""

from __future__ import annotations

import torch

IGNORE = -100  # a target the loss skips (padding, prompt tokens): torch's ignore_index
SLICE_ELEMENTS = 4 * 2**20  # logits in flight per slice: 16 MB in fp32
# Below this vocabulary the logits are small and the plain head's few fused kernels are faster. On a CPU
# the plain cross-entropy's backward is slow from a few thousand columns: at the demo's 4,096 tokens and
# 4,096 rows a whole training step of chatbot-cpu took 0.93x the plain head's time, at 2,048 0.98x, at
# 256 to 1,024 the same (AMX Xeon, fp32, 2 threads). GPUs keep the plain head below 8,192.
MIN_VOCAB = 8192
MIN_VOCAB_CPU = 2048


def pays(vocab_size: int, device: torch.device) -> bool:
    """Whether `head_loss_sum` beats the plain head and cross-entropy at this vocabulary on this device."""
    return vocab_size >= (MIN_VOCAB_CPU if device.type == "cpu" else MIN_VOCAB)


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy of `hidden` [N, C] through the head `weight` [V, C] against
    `targets` [N] (IGNORE marks a row to leave out), with its backward ready-made. Under
    autocast the products run in the autocast dtype, as `nn.Linear` would; the softmax and
    the sums in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    return _HeadLossSum.apply(hidden, weight, targets, dtype or hidden.dtype)


class _HeadLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            rows, vocab = hidden.shape[0], weight.shape[0]
            step = max(1, SLICE_ELEMENTS // vocab)
            x, head = hidden.detach().to(dtype), weight.detach().to(dtype)
            wide = torch.promote_types(dtype, torch.float32)
            wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_logits = torch.empty(rows, vocab, dtype=dtype, device=hidden.device) if wants_grad else None
            grad_hidden = torch.empty_like(hidden) if wants_grad else None
            total = torch.zeros((), dtype=wide, device=hidden.device)
            for start in range(0, rows, step):
                target = targets[start : start + step]
                kept = target != IGNORE
                picked = target.clamp(min=0).unsqueeze(1)
                logits = (x[start : start + step] @ head.t()).to(wide)
                norm = torch.logsumexp(logits, dim=1, keepdim=True)
                total += ((norm - logits.gather(1, picked)).squeeze(1) * kept).sum()
                if wants_grad:  # d(loss)/d(logits) = softmax - one-hot, in place over the logits; 0 where ignored
                    grad = logits.sub_(norm).exp_()
                    grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
                    grad = grad_logits[start : start + step] = grad.mul_(kept.unsqueeze(1))
                    # the hidden states' gradient now, while the head's cast is at hand: backward needs no copy
                    grad_hidden[start : start + step] = grad_logits[start : start + step] @ head
        ctx.save_for_backward(grad_logits, grad_hidden, x)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_logits, grad_hidden, x = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:  # a slice of the vocabulary at a time, straight into the weight's dtype
            grad_weight = torch.empty(grad_logits.shape[1], x.shape[1], dtype=ctx.weight_dtype, device=x.device)
            step = max(1, SLICE_ELEMENTS // x.shape[1])
            for start in range(0, grad_weight.shape[0], step):
                part = grad_logits[:, start : start + step].t() @ x
                grad_weight[start : start + step] = part.to(ctx.weight_dtype).mul_(grad_total)
        grad_hidden = grad_hidden * grad_total if ctx.needs_input_grad[0] else None
        return grad_hidden, grad_weight, None, None
