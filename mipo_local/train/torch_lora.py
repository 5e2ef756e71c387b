"""PEFT's LoRA linear layers computed as one autograd node each, for the torch backend (imports torch).

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling`: under autocast that is a cast of A and B on every
call, then a multiplication and an addition over the whole (tokens x out) output, and the same again in the
backward pass, where autograd also adds the two paths' input gradients as a third full-size tensor. Here the
scale goes on the rank-wide product (tokens x r) and the LoRA product is added inside the second matmul
(addmm), forward and backward. PEFT still owns the weights and the config (and its `disable_adapter()` still
works); only the arithmetic of the plain case (one adapter, no dropout, not merged) moves here, and the
switch to the base model that the backend's reference passes use (`adapters_off`).
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F

from . import torch_buffers
from .thread_state import set_for_block
from .torch_load import compute_dtype, transient_compute_copy

# The projections whose output the backward pass keeps (the gated activation keeps gate and up, attention
# keeps v): their outputs go to torch_buffers. q and k are rotated into new tensors, o and down are added to
# the residual stream: their outputs are temporaries.
KEPT_OUTPUTS = frozenset({"v_proj", "gate_proj", "up_proj"})

_switch = threading.local()


def adapters_off():
    """Until the block ends, every LoRA layer routed through here computes its base layer only (in this thread).

    What PEFT's `disable_adapter()` does, without its cost: PEFT inspects every module of the model on each
    use to report the adapters' state (97 ms on the default model, once per reference pass)."""
    return set_for_block(_switch, "off", True)


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


def _forward(self, x, *args, **kwargs):
    """PEFT's Linear.forward, with the plain case computed by LoraLinear."""
    base = self.base_layer
    if getattr(_switch, "off", False) or self.disable_adapters:  # adapters_off() or PEFT's own switch
        if self.merged:  # as PEFT's disabled layer does
            self.unmerge()
        if compute_dtype(base.weight) != base.weight.dtype:
            return frozen_linear(x, base.weight, base.bias)  # an fp16-stored base
        return base(x, *args, **kwargs)
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    plain = (
        not self.merged
        and not args
        and not kwargs
        and len(adapters) == 1
        and adapters[0] not in self.lora_variant
        and isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity)
    )
    if not plain:
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    with torch.autocast(x.device.type, enabled=False):  # LoraLinear picks its own dtype: the base's
        return LoraLinear.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            self.keeps_output,
        )


def fuse_lora_linears(model) -> int:
    """Route every PEFT LoRA Linear of `model` through LoraLinear; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for name, module in model.named_modules():
        if type(module) is Linear:
            module.keeps_output = name.rpartition(".")[2] in KEPT_OUTPUTS
            module._peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
