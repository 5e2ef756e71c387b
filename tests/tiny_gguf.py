"""Build tiny random GGUF models that carry the real default model's tokenizer and chat template.

The file is a real GGUF of the chosen architecture, so llama.cpp, the torch decoder and MLX all load the
same bytes. A few layers and a 64-wide hidden size keep every test fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mipo_local import gguf_io


@dataclass(frozen=True)
class TinyConfig:
    n_layers: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    context_length: int = 2048
    rope_freq_base: float = 10000.0
    seed: int = 0
    weight_type: str = "F32"  # F32 | F16 | Q8_0 | Q4_0 (matrices only; norms stay F32)
    std: float = 0.02
    architecture: str = "llama"  # llama | qwen2 (q/k/v biases) | qwen3 (q/k norms) | gemma3 (+ post norms)


_TOKENIZER_PREFIX = "tokenizer."


@dataclass(frozen=True)
class TokenizerChanges:
    """Changes to the copied tokenizer: another chat template, control tokens appended to the vocabulary
    (with BOS / EOS pointing at two of them), as a model family with its own turn markers has."""

    chat_template: str | None = None
    extra_control_tokens: tuple[str, ...] = ()
    bos: str | None = None
    eos: str | None = None
    add_bos: bool | None = None


def build_tiny_llama(
    source_gguf: Path, target: Path, cfg: TinyConfig = TinyConfig(), changes: TokenizerChanges | None = None
) -> Path:
    """Write a tiny llama GGUF at `target` with `source_gguf`'s tokenizer and chat template."""
    reader = gguf_io.open_reader(source_gguf)
    changes = changes or TokenizerChanges()
    tokens = [str(t) for t in reader.get_field(gguf.Keys.Tokenizer.LIST).contents()]
    tokens += changes.extra_control_tokens
    vocab = len(tokens)
    rng = np.random.default_rng(cfg.seed)
    head_dim = cfg.n_embd // cfg.n_head
    arch = cfg.architecture

    writer = gguf.GGUFWriter(target, arch, use_temp_file=False)
    writer.add_name(f"tiny-{arch}-{cfg.n_layers}x{cfg.n_embd}")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_rope_freq_base(cfg.rope_freq_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    if arch == "gemma3":
        writer.add_sliding_window(cfg.context_length // 4)
    qtype = gguf.GGMLQuantizationType[cfg.weight_type]
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[cfg.weight_type]
    )
    # Tokenizer and chat template copied with their exact types from the real model.
    K = gguf.Keys.Tokenizer
    n_extra = len(changes.extra_control_tokens)
    replaced = {
        K.LIST: tokens,
        K.TOKEN_TYPE: [*reader.get_field(K.TOKEN_TYPE).contents(), *[gguf.TokenType.CONTROL] * n_extra],
        K.CHAT_TEMPLATE: changes.chat_template,
        K.BOS_ID: tokens.index(changes.bos) if changes.bos else None,
        K.EOS_ID: tokens.index(changes.eos) if changes.eos else None,
        K.ADD_BOS: changes.add_bos,
    }
    if reader.get_field(K.SCORES) is not None:
        replaced[K.SCORES] = [*reader.get_field(K.SCORES).contents(), *[0.0] * n_extra]
    for key, field in reader.fields.items():
        if key.startswith(_TOKENIZER_PREFIX):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = replaced.get(key)
            writer.add_key_value(key, field.contents() if value is None else value, vtype, sub_type=sub)
    if changes.chat_template and reader.get_field(K.CHAT_TEMPLATE) is None:
        writer.add_chat_template(changes.chat_template)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * cfg.std).astype(np.float32)

    def add(name: str, array: np.ndarray) -> None:
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            data = gguf.quants.quantize(array.astype(np.float32), qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    T = gguf.MODEL_TENSOR
    name = gguf_io.tensor_name
    add(name(T.TOKEN_EMBD), matrix(vocab, cfg.n_embd))
    add(name(T.OUTPUT_NORM), np.ones(cfg.n_embd, np.float32))
    kv_dim = head_dim * cfg.n_head_kv
    for i in range(cfg.n_layers):
        add(name(T.ATTN_NORM, i), np.ones(cfg.n_embd, np.float32))
        add(name(T.ATTN_Q, i), matrix(cfg.n_embd, cfg.n_embd))
        add(name(T.ATTN_K, i), matrix(kv_dim, cfg.n_embd))
        add(name(T.ATTN_V, i), matrix(kv_dim, cfg.n_embd))
        if arch == "qwen2":
            for kind, rows in ((T.ATTN_Q, cfg.n_embd), (T.ATTN_K, kv_dim), (T.ATTN_V, kv_dim)):
                add(name(kind, i).replace(".weight", ".bias"), matrix(1, rows)[0] * 10)
        if arch in ("qwen3", "gemma3"):
            add(name(T.ATTN_Q_NORM, i), 1 + matrix(1, head_dim)[0] * 10)
            add(name(T.ATTN_K_NORM, i), 1 + matrix(1, head_dim)[0] * 10)
        add(name(T.ATTN_OUT, i), matrix(cfg.n_embd, cfg.n_embd))
        if arch == "gemma3":
            add(name(T.ATTN_POST_NORM, i), 1 + matrix(1, cfg.n_embd)[0] * 10)
            add(name(T.FFN_POST_NORM, i), 1 + matrix(1, cfg.n_embd)[0] * 10)
        add(name(T.FFN_NORM, i), np.ones(cfg.n_embd, np.float32))
        add(name(T.FFN_GATE, i), matrix(cfg.n_ff, cfg.n_embd))
        add(name(T.FFN_UP, i), matrix(cfg.n_ff, cfg.n_embd))
        add(name(T.FFN_DOWN, i), matrix(cfg.n_embd, cfg.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
