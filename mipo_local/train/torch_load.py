"""The torch backend's base model, built from the GGUF one tensor at a time (imports torch, transformers).

transformers' own GGUF loader (`from_pretrained(gguf_file=...)`) memory-maps the whole file, dequantizes
every tensor and holds the full state dict beside the model: 1.1 GB peak RSS for the default 135M model,
whose bf16 weights are 270 MB. Here the model is allocated without initialising it, and each tensor is read
from the file, converted exactly as transformers converts it (its per-architecture processor: llama's q/k
un-permutation, gemma's norm offset) and copied into place, so the peak is the model plus one tensor.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import gguf_io


def load_causal_lm(
    path: Path,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    reader=None,
    fp16_storage: tuple[str, ...] = (),
):
    """The GGUF at `path` as a transformers causal LM in `dtype`, on the CPU, in eval mode. `reader`: the
    file already opened with gguf_io.open_reader, if the caller has it.

    `fp16_storage`: name endings of matrices to keep in fp16 where every value is exactly an fp16 number (an
    F16 GGUF's are): half the memory of fp32 and the same numbers, for a caller that computes with them in
    fp32 (the torch backend's fp32 path; a plain nn.Linear would compute in fp16). An embedding that scales
    its output (Gemma's) computes in its weight's dtype, so it is never stored in fp16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    with _faster_gguf_py():
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with _no_init_weights():  # every parameter is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    reader = reader or gguf_io.open_reader(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    if type(model.get_input_embeddings()) is not torch.nn.Embedding:
        fp16_storage = tuple(e for e in fp16_storage if e != "embed_tokens.weight")
    loaded = set()
    with open(path, "rb") as fh, torch.no_grad(), _faster_gguf_py():
        for hf_name, weights in _hf_tensors(reader, fh, model):
            if hf_name not in params:
                continue
            if tuple(params[hf_name].shape) != weights.shape:  # e.g. a config key transformers cannot read
                raise ValueError(
                    f"{hf_name} is {weights.shape} in the file but {tuple(params[hf_name].shape)} in the model"
                )
            if hf_name.endswith(fp16_storage) and weights.ndim == 2 and _exact_in_fp16(weights):
                # The fp32 storage allocated for it was never touched, so it never took memory.
                params[hf_name].data = torch.from_numpy(weights.astype(np.float16))
            else:
                params[hf_name].copy_(torch.from_numpy(weights))
            loaded.add(hf_name)
    model.tie_weights()
    missing = {n for n, p in model.named_parameters() if n not in loaded} - _tied_names(model, loaded)
    if missing:
        raise ValueError(f"the GGUF has no tensor for {', '.join(sorted(missing)[:3])}")
    return model.eval()


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a frozen weight computes in: its own (bf16 on the fast path, fp32), except fp16, which is only
    a storage format here (load_causal_lm's fp16_storage: exact copies of an F16 GGUF's fp32 values)."""
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


def _hf_tensors(reader, fh, model):
    """(transformers parameter name, fp32 array) per GGUF tensor, processed as transformers' loader does."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    arch = str(gguf_io.field_value(reader, "general.architecture"))
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        result = processor.process(
            weights=_dequantize(fh, tensor), name=tensor.name, tensor_key_mapping=names, parsed_parameters={}
        )
        if result.name in names:
            yield names[result.name], np.ascontiguousarray(result.weights)


def _dequantize(fh, tensor) -> np.ndarray:
    """One tensor read with a plain file read: a memory-mapped read would leave every page of the file
    counted in the process's resident memory for as long as the mapping lives."""
    from gguf import dequantize

    fh.seek(tensor.data_offset)
    raw = np.fromfile(fh, dtype=tensor.data.dtype, count=tensor.data.size).reshape(tensor.data.shape)
    return dequantize(raw, tensor.tensor_type)


def _exact_in_fp16(weights: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # a value beyond fp16's range becomes inf: not exact, no warning needed
        half = weights.astype(np.float16)
    return bool(np.array_equal(half.astype(weights.dtype), weights))


def _tied_names(model, loaded: set[str]) -> set[str]:
    """Parameters that share their storage with a loaded one (a tied output head)."""
    by_ptr = {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False) if n in loaded}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() in by_ptr}


_GGUF_PY_SWAP = threading.Lock()


@contextmanager
def _faster_gguf_py():
    """Two gguf-py calls that transformers' GGUF code makes slowly, made fast for the duration of a load:

    - it reads the config through gguf-py's stock reader, 2.5 s on the default model's 49k-token
      vocabulary; gguf_io's subclass gives the same fields (config read 4.5 s -> 1.1 s, identical config);
    - get_gguf_hf_weights_map recurses into every submodule (397 on the default model) and builds a fresh
      tensor-name map for each, 7 s in all; the map depends only on (architecture, layers), so one is cached.
    """
    import gguf

    with _GGUF_PY_SWAP:
        stock_reader, stock_map = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader = gguf_io.FastReader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=4)(stock_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = stock_reader, stock_map


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
