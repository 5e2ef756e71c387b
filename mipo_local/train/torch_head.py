"""The output head fused with what the loss needs of it, for the torch backend (imports torch): the log-prob of
the target token, or the KL from a reference distribution.

DPO needs only log p(target) at response positions, never the logits themselves. Holding the full
(tokens x 49k-vocabulary) logits, their log-softmax and its gradient alive through the backward pass
costs hundreds of MB. Here the head never holds more than a block of them; when a gradient is needed,
d log p / d hidden is computed in the same pass (it depends only on that row's softmax and the target)
and kept instead of the logits, so the backward pass is one multiplication. Math per row h with target t:

    z = W h (optionally c * tanh(z / c)),   log p_t = z_t - logsumexp(z)
    d log p_t / d h = W^T (onehot_t - softmax(z))   (times the tanh derivative for a soft cap)
"""

from __future__ import annotations

import torch

from .torch_load import compute_dtype, transient_compute_copy

CHUNK_ROWS = 64  # HeadKL: 64 x 49k fp32 logits = 12.6 MB at a time
VOCAB_BLOCK = 1024  # HeadLogProbs: the vocabulary in blocks of this many tokens (a 2.4 MB fp32 slice of W)
MAX_SWEEP_ROWS = 1024  # rows sharing one sweep over the vocabulary: a block's logits are at most 4 MB


def _cap(logits: torch.Tensor, softcap: float):
    """Gemma's soft cap c * tanh(z / c), and tanh(z / c) for the derivative (None without a cap)."""
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return softcap * capped, capped


def _blocks(weight: torch.Tensor, size: int):
    """(first token, rows of W) for each block of `size` vocabulary tokens, in W's compute dtype: an
    fp16-stored head is cast one block at a time, never as a whole, into a reused buffer (valid until the
    next block is cast)."""
    for start in range(0, weight.shape[0], size):
        yield start, transient_compute_copy(weight[start : start + size])


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits W h of some rows."""
    low = compute_dtype(weight)
    if weight.dtype == low:
        return (h.to(low) @ weight.T).float()
    out = torch.empty(h.shape[0], weight.shape[0], device=h.device)
    h = h.to(low)
    for start, w in _blocks(weight, VOCAB_BLOCK):
        out[:, start : start + len(w)] = h @ w.T
    return out


def _hidden_grad(g: torch.Tensor, capped, weight: torch.Tensor, dtype) -> torch.Tensor:
    """d out / d hidden from d out / d logits (through the soft cap, if any)."""
    if capped is not None:
        g *= 1.0 - capped * capped
    low = compute_dtype(weight)
    if weight.dtype == low:
        return (g.to(low) @ weight).to(dtype)
    out = torch.zeros(g.shape[0], weight.shape[1], device=g.device)
    for start, w in _blocks(weight, VOCAB_BLOCK):
        out.addmm_(g[:, start : start + len(w)], w)
    return out.to(dtype)


class _FusedHead(torch.autograd.Function):
    """A head whose forward pass already computes d out / d hidden per row, so backward is one product."""

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (d_hidden,) = ctx.saved_tensors
        return d_hidden * grad_out[:, None].to(d_hidden.dtype), *[None] * (len(ctx.needs_input_grad) - 1)


def _sweep(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, softcap: float, block: int, want_grad: bool
):
    """log p(t | h) of some rows and, if wanted, d log p / d h, in one pass over the vocabulary.

    The softmax is computed online, block by block, as flash attention does over keys: a running maximum m,
    the running sum s of exp(z - m) and, for the gradient, the running sum of exp(z - m) W_v, all rescaled
    when m grows. Each block of W is read once for all rows and is still in the cache for the gradient's
    product; with the rows in chunks instead, the whole 49k x 576 matrix is read again for every chunk
    (memory-bound in fp32: measured 53 GFLOP/s for 64-row chunks, against 125 for the model's matmuls).
    """
    n = len(t)
    rows = torch.arange(n, device=t.device)
    # A bf16 logit near 20 is rounded to a multiple of 1/16. The target's own logit, the one term not
    # averaged away in the sum over tokens, is computed in fp32 (measured on the default model: the
    # bf16-vs-fp32 error of a response's summed log-prob, std 0.36 nats -> 0.25).
    target_row = weight[t].float()
    raw_target = (h.float() * target_row).sum(-1)
    target, target_tanh = _cap(raw_target, softcap)
    peak = torch.full((n,), -torch.inf, device=h.device)
    rest = torch.zeros(n, device=h.device)  # sum of exp(z - peak) over every token but the target
    pulled = torch.zeros(n, h.shape[1], device=h.device) if want_grad else None  # and of exp(z - peak) dz/dh
    # The matmuls run in the head's dtype (bf16 on the fast path), everything else in fp32.
    low = compute_dtype(weight)
    h_low = h.to(low)
    for start, w in _blocks(weight, block):
        z = (h_low @ w.T).float()
        inside = (t >= start) & (t < start + w.shape[0])
        at_target = (rows[inside], t[inside] - start)
        z[at_target] = raw_target[inside]
        tanh = z.div_(softcap).tanh_() if softcap else None
        z = tanh * softcap if softcap else z
        new_peak = torch.maximum(peak, z.amax(dim=-1))
        rescale = (peak - new_peak).exp_()
        e = z.sub_(new_peak[:, None]).exp_()
        # The target's own term is kept apart and added exactly at the end: where p_t is near 1, 1 - p_t and
        # W_t - p_t W_t would otherwise be mostly rounding error.
        e[at_target] = 0.0
        rest.mul_(rescale).add_(e.sum(dim=-1))
        if want_grad:
            if softcap:
                e.mul_(tanh.square_().neg_().add_(1.0))
            pulled.mul_(rescale[:, None]).add_((e.to(low) @ w).float())
        peak = new_peak
    own = (target - peak).exp()
    total = own + rest
    logp = target - peak - total.log()
    if not want_grad:
        return logp, None
    own_grad = target_row * (rest / total)[:, None]  # (1 - p_t) W_t
    if softcap:
        own_grad *= (1.0 - target_tanh * target_tanh)[:, None]
    return logp, own_grad - pulled / total[:, None]


class HeadLogProbs(_FusedHead):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float, block: int):
        want_grad = ctx.needs_input_grad[0]
        out, grads = [], []
        for start in range(0, hidden.shape[0], MAX_SWEEP_ROWS):
            end = start + MAX_SWEEP_ROWS
            logp, grad = _sweep(hidden[start:end], weight, targets[start:end], softcap, block, want_grad)
            out.append(logp)
            if want_grad:
                grads.append(grad)
        if want_grad:
            ctx.save_for_backward(torch.cat(grads).to(hidden.dtype))
        return torch.cat(out)


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float = 0.0,
    block: int = VOCAB_BLOCK,
):
    """log p(targets[i] | hidden[i]) in fp32 for rows of final hidden states; `weight` is the frozen head."""
    with torch.autocast(hidden.device.type, enabled=False):
        return HeadLogProbs.apply(hidden, weight, targets, softcap, block)


class HeadKL(_FusedHead):
    """Per row: KL(softmax(W h_ref) || softmax(W h)) over the whole vocabulary, chunked like HeadLogProbs.
    d KL / d logits = softmax(z) - softmax(z_ref); the reference rows get no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, softcap: float):
        want_grad = ctx.needs_input_grad[0]
        out, grads = [], []
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, hr = hidden[start : start + CHUNK_ROWS], ref_hidden[start : start + CHUNK_ROWS]
            z, capped = _cap(_logits(h, weight), softcap)
            z_ref, _ = _cap(_logits(hr, weight), softcap)
            log_p, log_q = torch.log_softmax(z, dim=-1), torch.log_softmax(z_ref, dim=-1)
            q = log_q.exp()
            out.append((q * (log_q - log_p)).sum(-1))
            if want_grad:
                grads.append(_hidden_grad(log_p.exp_().sub_(q), capped, weight, hidden.dtype))
        if want_grad:
            ctx.save_for_backward(torch.cat(grads))
        return torch.cat(out)


def head_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, softcap: float = 0.0):
    """KL(reference || policy) in fp32 per row, from the final hidden states of both; `weight`: the head."""
    with torch.autocast(hidden.device.type, enabled=False):
        return HeadKL.apply(hidden, ref_hidden, weight, softcap)
