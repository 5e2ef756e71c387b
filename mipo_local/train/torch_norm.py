"""RMSNorm as one autograd node, for the torch decoder (imports torch).

Written plainly, `weight * (x * rsqrt(mean(x^2) + eps))` keeps x and the normalized x for the backward pass
and makes about six fresh (tokens x hidden) tensors there; each fresh tensor lands on newly faulted pages
(the backend hands freed memory back to the OS). This node keeps x and the (tokens x 1) scale, takes the sum
of squares without a squared copy, and computes its input gradient with three fresh tensors (a training pass
of the default model 1.7% faster, measured in one process, alternating). float32 inputs only: the decoder
normalizes the residual stream, which stays fp32 in both precisions.
"""

from __future__ import annotations

import torch

from . import torch_buffers


class RMSNorm(torch.autograd.Function):
    """weight * x / sqrt(mean(x^2) + eps) over the last axis."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, kept: bool = True):
        scale = (
            torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        )
        ctx.save_for_backward(x, scale, weight)
        # The next projections keep the output for their backward pass: a torch_buffers tensor.
        out = torch_buffers.empty_like(x, x.dtype) if kept else torch.empty_like(x)
        return torch.mul(x, scale, out=out).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        # With s = scale and u = grad * weight: d x = s (u - x s^2 mean(u x)).
        x, scale, weight = ctx.saved_tensors
        u = grad * weight
        dot = (u * x).mean(-1, keepdim=True).mul_(scale.square())
        d_x = u.sub_(x * dot).mul_(scale)
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * x * scale).sum(tuple(range(grad.dim() - 1)))
        return d_x, d_weight, None, None
