"""The output head fused with what the loss needs of it, for the torch backend (imports torch): the log-prob of
the target token, or the KL from a reference distribution.

DPO needs only log p(target) at response positions, never the logits themselves. Holding the full
(tokens x 49k-vocabulary) logits, their log-softmax and its gradient alive through the backward pass
costs hundreds of MB. Here the head runs chunk by chunk; when a gradient is needed, d log p / d hidden
is computed in the same pass (it depends only on that row's softmax and the target) and kept instead of
the logits, so the backward pass is one multiplication. Math per row h with target t:

    z = W h (optionally c * tanh(z / c)),   log p_t = z_t - logsumexp(z)
    d log p_t / d h = W^T (onehot_t - softmax(z))   (times the tanh derivative for a soft cap)
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 64  # 64 x 49k fp32 logits = 12.6 MB at a time
NO_GRAD_CHUNK_ROWS = 128  # larger chunks are slower: their buffers are fresh pages each time


def _cap(logits: torch.Tensor, softcap: float):
    """Gemma's soft cap c * tanh(z / c), and tanh(z / c) for the derivative (None without a cap)."""
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return softcap * capped, capped


class _FusedHead(torch.autograd.Function):
    """A head whose forward pass already computes d out / d hidden per row, so backward is one product."""

    @staticmethod
    def _hidden_grad(g: torch.Tensor, capped, weight: torch.Tensor, dtype) -> torch.Tensor:
        """d out / d hidden from d out / d logits (through the soft cap, if any)."""
        if capped is not None:
            g *= 1.0 - capped * capped
        return (g.to(weight.dtype) @ weight).to(dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (d_hidden,) = ctx.saved_tensors
        return d_hidden * grad_out[:, None].to(d_hidden.dtype), None, None, None


class HeadLogProbs(_FusedHead):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float):
        want_grad = ctx.needs_input_grad[0]
        # Without a gradient no saved activations are alive, so the chunk can be larger (a faster matmul).
        chunk = CHUNK_ROWS if want_grad else NO_GRAD_CHUNK_ROWS
        out, grads = [], []
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            # The matmul runs in the head's dtype (bf16 on the fast path); everything after it in fp32.
            logits = (h.to(weight.dtype) @ weight.T).float()
            rows = torch.arange(len(t), device=t.device)
            # A bf16 logit near 20 is rounded to a multiple of 1/16. The target's own logit, the one term not
            # averaged away in the sum over tokens, is recomputed in fp32 (measured on the default model: the
            # bf16-vs-fp32 error of a response's summed log-prob, std 0.36 nats -> 0.25; recomputing the top-16
            # logits of the logsumexp too gained nothing: the rest comes from the bf16 layers).
            logits[rows, t] = (h.float() * weight[t].float()).sum(-1)
            logits, capped = _cap(logits, softcap)
            target = logits[rows, t]
            # The softmax in place, one exp for both the logsumexp and the gradient: one (rows x vocabulary)
            # fp32 buffer alive instead of four.
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            out.append(target - (peak + total.log()).squeeze(-1))
            if want_grad:
                g = probs.div_(total).neg_()  # -softmax
                g[rows, t] += 1.0
                grads.append(_FusedHead._hidden_grad(g, capped, weight, hidden.dtype))
        if want_grad:
            ctx.save_for_backward(torch.cat(grads))
        return torch.cat(out)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0):
    """log p(targets[i] | hidden[i]) in fp32 for rows of final hidden states; `weight` is the frozen head."""
    with torch.autocast(hidden.device.type, enabled=False):
        return HeadLogProbs.apply(hidden, weight, targets, softcap)


class HeadKL(_FusedHead):
    """Per row: KL(softmax(W h_ref) || softmax(W h)) over the whole vocabulary, chunked like HeadLogProbs.
    d KL / d logits = softmax(z) - softmax(z_ref); the reference rows get no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, softcap: float):
        want_grad = ctx.needs_input_grad[0]
        out, grads = [], []
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, hr = hidden[start : start + CHUNK_ROWS], ref_hidden[start : start + CHUNK_ROWS]
            z, capped = _cap((h.to(weight.dtype) @ weight.T).float(), softcap)
            z_ref, _ = _cap((hr.to(weight.dtype) @ weight.T).float(), softcap)
            log_p, log_q = torch.log_softmax(z, dim=-1), torch.log_softmax(z_ref, dim=-1)
            q = log_q.exp()
            out.append((q * (log_q - log_p)).sum(-1))
            if want_grad:
                grads.append(_FusedHead._hidden_grad(log_p.exp_().sub_(q), capped, weight, hidden.dtype))
        if want_grad:
            ctx.save_for_backward(torch.cat(grads))
        return torch.cat(out)


def head_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, softcap: float = 0.0):
    """KL(reference || policy) in fp32 per row, from the final hidden states of both; `weight`: the head."""
    with torch.autocast(hidden.device.type, enabled=False):
        return HeadKL.apply(hidden, ref_hidden, weight, softcap)
