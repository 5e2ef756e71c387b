"""The llama family's RMSNorm as one autograd node, for the torch backend (imports torch).

transformers' `weight * (x * rsqrt(mean(x^2) + eps))` keeps x and the normalized x for the backward pass and
makes about six fresh (tokens x hidden) tensors there; each fresh tensor lands on newly faulted pages (the
backend hands freed memory back to the OS). This node keeps x and the (tokens x 1) scale, takes the sum of
squares without a squared copy, and computes its input gradient with three fresh tensors. On the default
model a training pass ran 1.7% faster (in one process, alternating); the log-probs agree with
transformers' to float32 rounding (the sum of squares is added up in another order).

Only the norms that compute exactly that (llama, qwen2/3, mistral) and only float32 inputs take this path;
Gemma's `(1 + weight)` norm and bf16 inputs keep transformers' own forward.
"""

from __future__ import annotations

import types

import torch

from . import torch_buffers

LLAMA_STYLE = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


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


def _forward(self, hidden_states):
    if hidden_states.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    return RMSNorm.apply(
        hidden_states, self.weight, self.variance_epsilon, getattr(self, "keeps_output", True)
    )


def fuse_rms_norms(model) -> int:
    """Route every llama-style RMSNorm of `model` through RMSNorm (the weights are untouched); how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_STYLE and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
