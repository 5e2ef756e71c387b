"""Rotary position embedding as one autograd node per tensor, for the torch decoder (imports torch).

Written plainly, `q * cos + rotate(q) * sin` (rotate being a negation and a concatenation) makes five fresh
tensors of q's size in the forward pass and as many in the backward pass, for q and again for k. Fresh
tensors land on newly faulted pages (the backend hands freed memory back to the OS), which made these small
element-wise ops cost far more than their arithmetic. Here the rotation is one product and two in-place
multiply-adds on the two parts of each pair, forward and backward: one fresh tensor each way (a training
pass of the default model 2.7% faster, measured in one process, alternating).
"""

from __future__ import annotations

import torch

from . import torch_buffers


class Rotary(torch.autograd.Function):
    """x * cos + rotate(x) * sin over the last axis, with rotate(x) = (-x2, x1) for the two parts x1, x2 of each
    rotated pair: the halves of the axis (`halves`, NEOX order: qwen, gemma, transformers' rotate_half) or
    adjacent elements (llama.cpp's order for llama, whose GGUF stores q/k rows permuted for it)."""

    @staticmethod
    def forward(ctx, x, cos, sin, halves: bool = True):
        first, second = _parts(x.shape[-1], halves)
        # Attention keeps the rotated q and k for its backward pass: a torch_buffers tensor.
        out = torch.mul(x, cos, out=torch_buffers.empty_like(x, torch.result_type(x, cos)))
        out[..., first].addcmul_(x[..., second], sin[..., first], value=-1)
        out[..., second].addcmul_(x[..., first], sin[..., second])
        ctx.save_for_backward(cos, sin)
        ctx.halves = halves
        return out

    @staticmethod
    def backward(ctx, grad):
        # The transpose of the rotation: d x1 = g1 c1 + g2 s2, d x2 = g2 c2 - g1 s1.
        cos, sin = ctx.saved_tensors
        first, second = _parts(grad.shape[-1], ctx.halves)
        d_x = grad * cos
        d_x[..., first].addcmul_(grad[..., second], sin[..., second])
        d_x[..., second].addcmul_(grad[..., first], sin[..., first], value=-1)
        return d_x, None, None, None


def _parts(width: int, halves: bool) -> tuple[slice, slice]:
    if halves:
        return slice(None, width // 2), slice(width // 2, None)
    return slice(0, None, 2), slice(1, None, 2)
