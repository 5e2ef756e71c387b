"""The gated MLP's `act(gate) * up` as one autograd node that keeps less for the backward pass (imports torch).

Left to autograd, `act(gate) * up` keeps gate (for act's derivative), act(gate) and up (for the product):
three (tokens x intermediate) tensors per layer. This node keeps gate and up and recomputes act(gate) in the
backward pass, one cheap elementwise op. Measured on the default model: 28 MB less per 300-token pair.
The products are taken in place: every fresh tensor of that size lands on newly faulted pages (the backend
hands freed memory back to the OS), and two fewer a layer made a training pass 3% faster.
"""

from __future__ import annotations

import torch

from . import torch_buffers


class GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return _activate(act, gate).mul_(up)  # in place: one new (tokens x intermediate) tensor, not two

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_()
            activated = ctx.act(g)
        (d_gate,) = torch.autograd.grad(activated, g, grad * up)
        return d_gate, activated.detach().mul_(grad), None  # the graph is spent: reuse its output


def _activate(act, gate: torch.Tensor) -> torch.Tensor:
    """act(gate); SiLU's (llama, qwen) into a torch_buffers tensor, since the down projection keeps the product."""
    if act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU):
        return torch.ops.aten.silu.out(gate, out=torch_buffers.empty_like(gate, gate.dtype))
    return act(gate)
