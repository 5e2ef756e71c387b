"""Read, validate, dequantize and write GGUF files with gguf-py.

Keys and tensor names come from gguf-py's constants (`gguf.Keys`, `gguf.MODEL_TENSOR`), never typed by
hand, so a file we write is the file llama.cpp expects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelError
from .fsutil import atomic_path

GGUF_MAGIC = b"GGUF"
# Architectures whose training, export and chat paths are implemented end to end.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# The tensors LoRA may target, by short name, and their GGUF tensor kinds.
LORA_TARGET_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "q": gguf.MODEL_TENSOR.ATTN_Q,
    "k": gguf.MODEL_TENSOR.ATTN_K,
    "v": gguf.MODEL_TENSOR.ATTN_V,
    "o": gguf.MODEL_TENSOR.ATTN_OUT,
    "gate": gguf.MODEL_TENSOR.FFN_GATE,
    "up": gguf.MODEL_TENSOR.FFN_UP,
    "down": gguf.MODEL_TENSOR.FFN_DOWN,
}


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    """The GGUF name of a tensor, e.g. `blk.3.attn_q.weight`."""
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), the reverse of ggml's ne
    type: gguf.GGMLQuantizationType
    n_elements: int


@dataclass
class GGUFInfo:
    """What the rest of mipo-local needs to know about a GGUF model, read once."""

    path: Path
    architecture: str
    name: str
    file_type: int | None
    n_params: int
    n_layers: int
    n_embd: int
    context_length: int
    chat_template: str | None
    metadata: dict[str, Any] = field(repr=False)
    tensors: list[TensorInfo] = field(repr=False)

    @property
    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type.name] = counts.get(t.type.name, 0) + 1
        return counts

    def arch_key(self, suffix: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}")


class FastReader(gguf.GGUFReader):
    """gguf-py's reader, 3x faster to open on files with a large vocabulary.

    The stock reader slices its np.memmap once per array element (49k tokens, 49k merges), and each memmap
    slice runs Python-level hooks; slicing a plain ndarray view of the same mapping gives identical
    fields and tensors without them.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        arr = plain[offset : offset + dt.itemsize * count].view(dtype=dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def check_gguf_file(path: str | os.PathLike) -> Path:
    """`path`, after clear errors for a missing file, a directory, or a file that is not a GGUF."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"Model file not found: {path}.")
    if not path.is_file():
        raise ModelError(f"Model path is not a file: {path}.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    return path


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open a GGUF with clear errors for a missing, foreign or truncated file."""
    path = check_gguf_file(path)
    try:
        reader = FastReader(path, "r")
    except Exception as err:  # gguf-py raises ValueError/IndexError/etc. on damaged files
        raise ModelError(
            f"{path} is a damaged or truncated GGUF file ({type(err).__name__}: {err})."
        ) from err
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(
            f"{path} is a truncated GGUF file: its tensors need {end} bytes, the file has {size}."
        )
    return reader


def field_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


_SMALL_ARRAY = 64  # arrays longer than this (vocab, merges) are not copied into GGUFInfo.metadata


def read_info(
    path: str | os.PathLike, *, check_arch: bool = True, reader: gguf.GGUFReader | None = None
) -> GGUFInfo:
    """Read a GGUF's header and tensor table. Raises ModelError for bad or unsupported files.

    Pass `reader` (from open_reader) to reuse an open file: parsing a big vocabulary takes seconds.
    """
    path = Path(path)
    reader = reader if reader is not None else open_reader(path)
    metadata: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > _SMALL_ARRAY:
            metadata[key] = f"<array of {len(f.data)}>"
            continue
        metadata[key] = f.contents()
    arch = metadata.get(gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise ModelError(f"{path} has no general.architecture key; it is not a model GGUF.")
    if check_arch and arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path} uses the architecture '{arch}', which mipo-local does not support; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    tensors = [
        TensorInfo(
            t.name, tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type, int(t.n_elements)
        )
        for t in reader.tensors
    ]
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=str(metadata.get(gguf.Keys.General.NAME) or path.stem),
        file_type=metadata.get(gguf.Keys.General.FILE_TYPE),
        n_params=sum(t.n_elements for t in tensors),
        n_layers=int(metadata.get(f"{arch}.block_count", 0)),
        n_embd=int(metadata.get(f"{arch}.embedding_length", 0)),
        context_length=int(metadata.get(f"{arch}.context_length", 0)),
        chat_template=metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE),
        metadata=metadata,
        tensors=tensors,
    )


def tensor_to_float32(t: gguf.ReaderTensor) -> np.ndarray:
    """Dequantize a reader tensor to float32 in numpy order (rows first)."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def iter_float_tensors(reader: gguf.GGUFReader) -> Iterator[tuple[str, np.ndarray]]:
    for t in reader.tensors:
        yield t.name, tensor_to_float32(t)


def copy_metadata(
    reader: gguf.GGUFReader,
    writer: gguf.GGUFWriter,
    *,
    skip: Iterable[str] = (),
    overrides: dict | None = None,
) -> None:
    """Copy every key/value of `reader` into `writer` with its exact type, except `skip` and GGUF.*."""
    skip = set(skip) | {gguf.Keys.General.ARCHITECTURE}  # the writer adds the architecture itself
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub_type)
    for key, (value, vtype) in (overrides or {}).items():
        writer.add_key_value(key, value, vtype)


def f16_storage(name: str, array: np.ndarray) -> np.ndarray:
    """llama.cpp's convention: 1-D tensors (norms, biases) stay F32, matrices are stored as F16."""
    return array.astype(np.float32 if array.ndim == 1 else np.float16)


def write_gguf(
    target: str | os.PathLike,
    reader: gguf.GGUFReader,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    file_type: int | None = gguf.LlamaFileType.MOSTLY_F16,
    extra_metadata: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write a GGUF with all of `reader`'s metadata and the given tensors, atomically.

    `tensors` yields (name, array) pairs already in their storage dtype (float32 / float16).
    """
    target = Path(target)
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    overrides = dict(extra_metadata or {})
    skip: set[str] = set(overrides)
    if file_type is not None:
        skip.add(gguf.Keys.General.FILE_TYPE)
        overrides[gguf.Keys.General.FILE_TYPE] = (int(file_type), gguf.GGUFValueType.UINT32)
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=False)
        copy_metadata(reader, writer, skip=skip, overrides=overrides)
        for name, array in tensors:
            writer.add_tensor(name, np.ascontiguousarray(array))
            if on_tensor:
                on_tensor(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def dequantize_to_f16(
    source: str | os.PathLike, target: str | os.PathLike, *, chat_template: str | None = None
) -> Path:
    """Write an F16 working copy of `source` that keeps every metadata key (tokenizer, template, rope).

    `chat_template` is added only when given (for base models whose GGUF carries none).
    """
    reader = open_reader(source)
    tensors = ((name, f16_storage(name, arr)) for name, arr in iter_float_tensors(reader))
    extra = (
        {gguf.Keys.Tokenizer.CHAT_TEMPLATE: (chat_template, gguf.GGUFValueType.STRING)}
        if chat_template
        else None
    )
    return write_gguf(target, reader, tensors, file_type=gguf.LlamaFileType.MOSTLY_F16, extra_metadata=extra)


def gguf_permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: the permutation convert_hf_to_gguf applies to HF's q/k weights.

    Applied to LoRA's b (out x rank) it maps an HF-layout delta to the GGUF layout.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of gguf_permute_rows (GGUF q/k row order back to HF's)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
