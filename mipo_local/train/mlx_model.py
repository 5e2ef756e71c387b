"""Build an mlx-lm model from a GGUF file, for the MLX training backend.

The architecture arguments come from the GGUF metadata, the weights from its tensors: Q4_0, Q4_1 and Q8_0
matrices stay quantized (MLX's affine format, group size 32: QLoRA on the GGUF's own weights), every
other type is dequantized. Tensor names are mapped from gguf-py's table to mlx-lm's parameter names, and
llama's q/k rotary permutation (applied by llama.cpp's converter) is undone, so the model is exactly
mlx-lm's. Imports mlx: only the MLX backend loads this module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import gguf_io
from ..errors import ModelError
from ..gguf_io import gguf_unpermute_rows

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
GROUP_SIZE = 32  # every GGUF block format MLX reads (Q4_0, Q4_1, Q8_0) has 32 weights per block
KEPT_QUANTIZED = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

_TOP_LEVEL = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm", T.OUTPUT: "lm_head"}
_BLOCK = {
    T.ATTN_NORM: "input_layernorm",
    T.ATTN_Q: "self_attn.q_proj",
    T.ATTN_K: "self_attn.k_proj",
    T.ATTN_V: "self_attn.v_proj",
    T.ATTN_OUT: "self_attn.o_proj",
    T.ATTN_Q_NORM: "self_attn.q_norm",
    T.ATTN_K_NORM: "self_attn.k_norm",
    T.FFN_GATE: "mlp.gate_proj",
    T.FFN_UP: "mlp.up_proj",
    T.FFN_DOWN: "mlp.down_proj",
}
# Gemma 3 has four norms per block; the others call their pre-MLP norm post_attention_layernorm.
_BLOCK_NORMS = {
    "gemma3": {
        T.ATTN_POST_NORM: "post_attention_layernorm",
        T.FFN_NORM: "pre_feedforward_layernorm",
        T.FFN_POST_NORM: "post_feedforward_layernorm",
    },
    "default": {T.FFN_NORM: "post_attention_layernorm"},
}


@dataclass
class ModelFile:
    """What building the model needs from a GGUF: its metadata (small values) and its tensors' row counts."""

    path: Path
    architecture: str
    metadata: dict[str, Any]
    rows: dict[str, int]  # tensor name -> first numpy dimension (packed quantized arrays keep it)

    def arch_key(self, suffix: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}")

    @property
    def n_layers(self) -> int:
        return int(self.arch_key("block_count"))


def model_args(info: ModelFile) -> dict:
    """mlx-lm's ModelArgs fields (a superset; each architecture's from_dict keeps its own) from the metadata."""
    key = info.arch_key
    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    params = {
        "model_type": MODEL_TYPES[info.architecture],
        "hidden_size": n_embd,
        "num_hidden_layers": info.n_layers,
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv") or n_head),
        "head_dim": int(key("attention.key_length") or n_embd // n_head),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "vocab_size": info.rows[gguf_io.tensor_name(T.TOKEN_EMBD)],
        "max_position_embeddings": int(key("context_length") or 4096),
        "rope_theta": float(key("rope.freq_base") or 10000.0),
        "tie_word_embeddings": gguf_io.tensor_name(T.OUTPUT) not in info.rows,
    }
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        params["rope_scaling"] = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelError(
            f"{info.path} uses '{scaling}' rope scaling, which the MLX backend does not support."
        )
    if info.architecture == "gemma3":
        # llama.cpp fixes these for Gemma 3 instead of storing them: 5 local layers per global one,
        # local rope base 10k, attention scaled by the head size.
        params.update(
            query_pre_attn_scalar=params["head_dim"],
            sliding_window=int(key("attention.sliding_window") or 512),
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
        )
    return params


def _repack_block_quants(t: gguf.ReaderTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 / Q4_1 / Q8_0 tensor as MLX's affine triple (packed uint32 weight, scales, biases).

    Exact: each GGUF block's value d*(q - offset) (+ m for Q4_1) is scale*q' + bias with scale=d.
    """
    bits = KEPT_QUANTIZED[t.tensor_type]
    block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
    blocks = np.asarray(t.data).reshape(
        -1, int(t.shape[0]) // GROUP_SIZE, block_bytes
    )  # shape[0]: ggml's ne0
    rows = blocks.shape[0]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if t.tensor_type == Q.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d * np.float16(-128)
    else:
        nibbles = blocks[..., 4:] if t.tensor_type == Q.Q4_1 else blocks[..., 2:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # byte j holds weights j and j + 16
        bias = (
            blocks[..., 2:4].copy().view(np.float16)[..., 0]
            if t.tensor_type == Q.Q4_1
            else d * np.float16(-8)
        )
    q = q.reshape(rows, -1, 32 // bits).astype(np.uint32)
    packed = np.zeros(q.shape[:2], np.uint32)
    for i in range(32 // bits):  # MLX packs the first weight into the lowest bits
        packed |= q[..., i] << np.uint32(bits * i)
    return packed, d, bias


def read_model_file(path: Path) -> tuple[ModelFile, dict[str, mx.array]]:
    """The file's metadata and its GGUF-named arrays: `<stem>.weight`, plus `<stem>.scales` / `<stem>.biases`
    for the quantized ones. Raises ModelError (from gguf_io) for a missing, foreign or damaged file."""
    try:  # the fast path: MLX reads F32/F16/Q4_0/Q4_1/Q8_0 files and their metadata natively
        tensors, meta = mx.load(str(path), return_metadata=True)
        metadata = {k: v.item() if isinstance(v, mx.array) and v.ndim == 0 else v for k, v in meta.items()}
        rows = {k: v.shape[0] for k, v in tensors.items()}
        arch = str(metadata.get(gguf.Keys.General.ARCHITECTURE, ""))
        return ModelFile(Path(path), arch, metadata, rows), tensors
    except Exception:  # noqa: BLE001 - any failure goes to gguf-py, which names the problem
        pass  # other tensor types (K-quants, Q5_0...) or a bad file: gguf-py reads it or says what is wrong
    reader = gguf_io.open_reader(path)
    info = gguf_io.read_info(path, reader=reader, check_arch=False)
    tensors = {}
    for t in reader.tensors:  # repack the block quants MLX keeps, dequantize the rest
        if t.tensor_type in KEPT_QUANTIZED:
            stem = t.name.removesuffix(".weight")
            w, scales, biases = _repack_block_quants(t)
            tensors[t.name], tensors[f"{stem}.scales"], tensors[f"{stem}.biases"] = (
                mx.array(a) for a in (w, scales, biases)
            )
        else:
            tensors[t.name] = mx.array(gguf_io.tensor_to_float32(t))
    rows = {t.name: t.shape[0] for t in info.tensors}
    return ModelFile(Path(path), info.architecture, info.metadata, rows), tensors


def _stem_map(architecture: str, n_layers: int) -> dict[str, tuple[str, gguf.MODEL_TENSOR]]:
    """GGUF tensor stem (e.g. `blk.0.attn_q`) -> (mlx-lm module path, tensor kind)."""
    stems = {gguf.TENSOR_NAMES[k]: (path, k) for k, path in _TOP_LEVEL.items()}
    block = {**_BLOCK, **_BLOCK_NORMS.get(architecture, _BLOCK_NORMS["default"])}
    for i in range(n_layers):
        for kind, path in block.items():
            stems[gguf.TENSOR_NAMES[kind].format(bid=i)] = (f"model.layers.{i}.{path}", kind)
    return stems


def mlx_weights(tensors: dict[str, mx.array], info: ModelFile, dtype) -> tuple[dict, mx.array | None]:
    """Rename to mlx-lm's parameter names, undo llama's q/k permutation, cast floats to `dtype`.

    Returns (weights, rope_freqs): llama 3's per-frequency rope factors travel as a tensor in the GGUF.
    """
    stems = _stem_map(info.architecture, info.n_layers)
    n_head = int(info.arch_key("attention.head_count"))
    n_head_kv = int(info.arch_key("attention.head_count_kv") or n_head)
    weights, rope_freqs = {}, None
    for name, array in tensors.items():
        stem, suffix = name.rsplit(".", 1)
        if stem == gguf.TENSOR_NAMES[T.ROPE_FREQS]:
            rope_freqs = array.astype(mx.float32)
            continue
        if stem not in stems:
            raise ModelError(
                f"{info.path} has a tensor '{name}' that mipo-local cannot place in a {info.architecture} model."
            )
        path, kind = stems[stem]
        if info.architecture == "llama" and kind in (T.ATTN_Q, T.ATTN_K):
            heads = n_head if kind == T.ATTN_Q else n_head_kv
            array = mx.array(gguf_unpermute_rows(np.array(array), heads))  # rows only: exact for packed ones
        if array.dtype != mx.uint32:
            array = array.astype(dtype)
        if info.architecture == "gemma3" and "NORM" in kind.name:
            array = array - 1  # llama.cpp stores Gemma's (1 + w) norm weights; mlx-lm adds the 1 itself
        weights[f"{path}.{suffix}"] = array
    return weights, rope_freqs


class FactorRoPE(nn.Module):
    """Rotary embedding with llama.cpp's per-frequency factors (`rope_freqs`, llama 3's long-context rope)."""

    def __init__(self, dims: int, base: float, factors: mx.array):
        super().__init__()
        self.dims = dims
        self._periods = factors * base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)

    def __call__(self, x, offset: int = 0):
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods
        )


def load_model(path: Path, dtype=mx.float32) -> tuple[nn.Module, ModelFile]:
    """The frozen mlx-lm model of a GGUF file, and the file's metadata. Raises ModelError for what it cannot load."""
    info, tensors = read_model_file(path)
    if info.architecture not in MODEL_TYPES:
        raise ModelError(
            f"{path} uses the architecture '{info.architecture}', which the MLX backend does not support; "
            f"supported: {', '.join(MODEL_TYPES)}."
        )
    params = model_args(info)
    module = importlib.import_module(f"mlx_lm.models.{params['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(params))
    weights, rope_freqs = mlx_weights(tensors, info, dtype)
    weights = model.sanitize(weights)
    bits = {
        key.removesuffix(".scales"): weights[key.replace(".scales", ".weight")].shape[1]
        * 32
        // (v.shape[1] * GROUP_SIZE)
        for key, v in weights.items()
        if key.endswith(".scales")
    }
    nn.quantize(
        model,
        class_predicate=lambda p, _m: (
            {"group_size": GROUP_SIZE, "bits": bits[p], "mode": "affine"} if p in bits else False
        ),
    )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise ModelError(f"{path} does not fit mlx-lm's {params['model_type']} model ({err}).") from err
    if rope_freqs is not None:
        for layer in model.layers:
            layer.self_attn.rope = FactorRoPE(params["head_dim"], params["rope_theta"], rope_freqs)
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    return model, info
