"""A LoRA linear layer as one autograd node, for the torch decoder (imports torch).

Written plainly, `x W^T + (x A^T) B^T * scale` under bf16 is a cast of A and B on every call, then a
multiplication and an addition over the whole (tokens x out) output, and the same again in the backward
pass, where autograd also adds the two paths' input gradients as a third full-size tensor. Here the scale
goes on the rank-wide product (tokens x r) and the LoRA product is added inside the second matmul (addmm),
forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import torch_buffers
from .torch_load import compute_dtype, transient_compute_copy


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, kept: bool = False
) -> torch.Tensor:
    """x W^T + bias in the frozen weight's compute dtype; an fp16-stored weight is cast for this product only.
    `kept`: the backward pass keeps the result (a 2-D product without bias then goes to torch_buffers)."""
    dtype = compute_dtype(weight)
    # Without a graph to keep it, the cast can go to a reused buffer (torch_load.transient_compute_copy).
    w = transient_compute_copy(weight) if not torch.is_grad_enabled() else weight.to(dtype)
    x = x.to(dtype)
    if kept and bias is None and x.dim() == 2:
        return torch.mm(x, w.T, out=torch_buffers.empty((x.shape[0], w.shape[0]), dtype, x.device))
    return F.linear(x, w, None if bias is None else bias.to(dtype))


class LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + s (x A^T) B^T, in the frozen weight's compute dtype (bf16 on the fast path).

    The rank-wide products are computed as (r x tokens) and (r x features) results, never (tokens x r) or
    (features x r): with r = 8, the narrow orientation ran 1.4-4x slower (a 1536 x 8 result: 950 us
    against 234) and all LoRA products together took 5.6% of a step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, kept: bool = False):
        dtype = compute_dtype(weight)
        x = x.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        down_t = (a @ flat.T).mul_(scale)  # (r x tokens) = s (x A^T)^T: the scale costs nothing here
        # In place: addmm would copy the base output. The backward pass casts an fp16-stored weight again
        # rather than keep an fp32 copy alive.
        out = frozen_linear(flat, weight, bias, kept=kept).addmm_(down_t.T, b.T)
        ctx.save_for_backward(flat, down_t, weight, a, b)
        ctx.scale, ctx.x_shape, ctx.param_dtype = scale, x.shape, lora_a.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, down_t, weight, a, b = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).to(compute_dtype(weight))
        grad_down_t = (b.T @ grad.T).mul_(ctx.scale)  # (r x tokens): d out / d (x A^T), the scale included
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ transient_compute_copy(weight)).addmm_(grad_down_t.T, a).reshape(ctx.x_shape)
        grad_a = (grad_down_t @ flat).to(ctx.param_dtype)
        grad_b = (down_t @ grad).T.to(ctx.param_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None
