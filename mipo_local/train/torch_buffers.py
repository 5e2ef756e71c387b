"""Tensors a training pass keeps for its backward pass, written into buffers reused from pass to pass (imports torch).

Why: on CPU the backend hands freed memory back to the OS after each pair (torch_backend._return_freed_memory;
without it glibc's fragmentation raised the benchmark's peak by ~150 MB), so every fresh tensor of the next pass
lands on newly faulted pages: ~3.4 us a 4 kB page on the benchmark VM, a third of the time of the matmul that
writes a 1.8 MB output. A training pass makes the same tensors in the same order every time (layer 7's gate
product, ...), so the i-th buffer asked for in a pass plays the same part in every pass: kept from one pass to
the next, its pages are faulted in once per run instead of once per pair. The tensors that live until the
backward pass anyway are the ones worth it (a reused buffer is not handed to the next temporary of the pass).

A buffer is only reused when nothing else holds a view of it (torch's storage use count); otherwise, or where
torch does not tell, a fresh tensor is made, so a tensor that outlives its pass is never overwritten.
"""

from __future__ import annotations

import math
import threading

import torch

from .thread_state import set_for_block

_active = threading.local()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: no buffer is ever reused


def _storage_use_count(t: torch.Tensor) -> int | None:
    return None if _use_count is None else _use_count(t.untyped_storage()._cdata)


_UNSHARED = _storage_use_count(torch.empty(1))  # a tensor's own reference (+ the probe's), nobody else's


def _handing_out(pool: PassBuffers | None):
    """`pool` serves this thread's empty() calls until the block ends (None: fresh tensors)."""
    return set_for_block(_active, "pool", pool)


class PassBuffers:
    """The buffers of one backend's training passes: the i-th `empty()` of a pass gets buffer i."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def training_pass(self):
        """Hand out buffers to the `empty()` calls of this thread until the block ends (forward + backward)."""
        self._next = 0
        return _handing_out(self)

    @staticmethod
    def paused():
        """Fresh tensors again inside a training pass (for a forward pass without gradients in it)."""
        return _handing_out(None)

    def take(self, shape, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        n = math.prod(shape)
        if i == len(self._buffers):
            self._buffers.append(torch.empty(0))
        buffer = self._buffers[i]
        reusable = (
            buffer.numel() >= n
            and buffer.dtype == dtype
            and buffer.device == device
            and _UNSHARED is not None
            and _storage_use_count(buffer) == _UNSHARED
        )
        if not reusable:  # the old buffer, if held elsewhere, stays with its holder
            buffer = self._buffers[i] = torch.empty(n, dtype=dtype, device=device)
        # Not a view of the buffer: autograd would tie the buffer to the graph through in-place ops on one.
        return torch.empty(0, dtype=dtype, device=device).set_(buffer.untyped_storage(), 0, shape, stride)


def empty(shape, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """An uninitialised tensor (contiguous, or with the given dense `stride`): a reused buffer inside
    PassBuffers.training_pass() on CPU, a fresh tensor elsewhere. For the tensors a backward pass keeps,
    written at once by an `out=` op."""
    pool = getattr(_active, "pool", None)
    if pool is None or device.type != "cpu":
        if stride is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return pool.take(tuple(shape), dtype, device, stride)


def empty_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """empty(), laid out in memory as `t` is when `t` is dense (a transposed q stays transposed, as
    torch.empty_like would keep it: the ops that read it next are tuned to that layout)."""
    stride = _dense_stride(t)
    if stride is None:
        return torch.empty_like(t, dtype=dtype)
    return empty(t.shape, dtype, t.device, stride)


def _dense_stride(t: torch.Tensor) -> tuple[int, ...] | None:
    """t's strides if its elements fill one block of memory without gaps or overlaps, else None."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return t.stride()
