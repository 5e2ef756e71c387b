"""Reading GGUF tensors for the torch backend, one at a time, and computing with fp16-stored weights (imports torch).

A tensor is read with a plain file read and dequantized alone (torch_decoder fills the model from these),
so a load peaks at the model plus one tensor and never maps the whole file into the process's memory.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a frozen weight computes in: its own (bf16 on the fast path, fp32), except fp16, which is only
    a storage format here (torch_decoder's fp16_storage: exact copies of an F16 GGUF's values)."""
    return torch.float32 if weight.dtype == torch.float16 else weight.dtype


_cast_buffers = threading.local()  # per thread: a training thread and another one never share a buffer


def transient_compute_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in its compute dtype for one product that keeps no reference to it (no autograd graph).

    An fp16-stored weight is cast into a buffer kept per shape and reused by every later cast of that
    shape: a fresh 3.5 MB tensor per cast would come from newly mapped pages (the backend hands freed memory
    back to the OS), and the page faults made each cast of the default model's MLP matrices take 1.1 ms
    instead of 0.3. The result is overwritten by the next cast of the same shape: use it at once.
    """
    if weight.dtype != torch.float16:
        return weight
    buffers = _cast_buffers.__dict__.setdefault("by_shape", {})
    key = (tuple(weight.shape), weight.device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    return buffer.copy_(weight)


def dequantized(fh, tensor) -> np.ndarray:
    """One tensor read with a plain file read: a memory-mapped read would leave every page of the file
    counted in the process's resident memory for as long as the mapping lives."""
    from gguf import dequantize

    fh.seek(tensor.data_offset)
    raw = np.fromfile(fh, dtype=tensor.data.dtype, count=tensor.data.size).reshape(tensor.data.shape)
    return dequantize(raw, tensor.tensor_type)


def exact_in_fp16(weights: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # a value beyond fp16's range becomes inf: not exact, no warning needed
        half = weights.astype(np.float16)
    return bool(np.array_equal(half.astype(weights.dtype), weights))
