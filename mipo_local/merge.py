"""Merge a trained LoRA into the base GGUF and write an F16 GGUF, one tensor at a time.

W' = W + scale * b @ a for every targeted tensor (adapter_io's layout is already GGUF's, so no
permutation happens here); every other tensor is copied (dequantized when the base is quantized). The
output keeps every metadata key of the base and adds provenance keys under `mipo_local.`. Tensors are
written as they are computed, so memory stays near one tensor plus the memory-mapped base.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import __version__, gguf_io
from .adapter_io import LoraTensor
from .errors import ExportError
from .fsutil import atomic_path

PROVENANCE_PREFIX = "mipo_local."


def provenance(
    *, base_sha256: str, run_name: str, run_settings: dict
) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """Metadata keys that say where an exported file came from."""
    S = gguf.GGUFValueType.STRING
    return {
        f"{PROVENANCE_PREFIX}version": (__version__, S),
        f"{PROVENANCE_PREFIX}base_sha256": (base_sha256, S),
        f"{PROVENANCE_PREFIX}run": (run_name, S),
        f"{PROVENANCE_PREFIX}settings": (json.dumps(run_settings, sort_keys=True), S),
    }


def check_lora(tensors: dict[str, LoraTensor], reader: gguf.GGUFReader, source: Path) -> None:
    """Every LoRA pair must name a base tensor and fit its shape (out x in).

    Raises:
        ExportError: naming the first tensor that does not fit.
    """
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    for name, lora in tensors.items():
        if name not in shapes:
            raise ExportError(
                f"The adapter has LoRA weights for '{name}', a tensor the base model {source} lacks."
            )
        out_dim, in_dim = shapes[name]
        a, b = lora.a, lora.b
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != in_dim
            or b.shape[0] != out_dim
            or a.shape[0] != b.shape[1]
        ):
            raise ExportError(
                f"The adapter's LoRA weights for '{name}' have shapes a{tuple(a.shape)} b{tuple(b.shape)}, "
                f"which do not fit the base tensor ({out_dim} x {in_dim})."
            )


def _storage_type(t: gguf.ReaderTensor) -> tuple[np.dtype, int]:
    """(numpy dtype, bytes) of a tensor as the F16 output stores it: matrices F16, vectors F32."""
    n = int(t.n_elements)
    return (np.dtype(np.float32), 4 * n) if len(t.shape) == 1 else (np.dtype(np.float16), 2 * n)


def merged_f16_bytes(reader: gguf.GGUFReader) -> int:
    """Approximate size of the merged F16 file (tensor data; metadata adds a few MB at most)."""
    return sum(_storage_type(t)[1] for t in reader.tensors)


def merge_steps(
    base: str | os.PathLike,
    target: str | os.PathLike,
    tensors: dict[str, LoraTensor],
    *,
    metadata: dict[str, tuple[Any, gguf.GGUFValueType]],
    reader: gguf.GGUFReader | None = None,
) -> Iterator[tuple[int, int]]:
    """Write base + LoRA deltas as an F16 GGUF at `target`, atomically, yielding (tensors done, total).

    Closing the generator early removes the partial file.

    Args:
        base: the base GGUF (any type gguf-py can dequantize).
        target: the output path.
        tensors: LoRA pairs keyed by base tensor name (adapter_io layout).
        metadata: extra keys (provenance); every base key is kept.
        reader: a reader already open on `base` (opening one on a 49k-token vocabulary takes seconds).

    Raises:
        ExportError: a LoRA tensor does not fit the base model.
    """
    reader = reader or gguf_io.open_reader(base)
    check_lora(tensors, reader, Path(base))
    arch = gguf_io.field_value(reader, gguf.Keys.General.ARCHITECTURE)
    overrides = dict(metadata)
    overrides[gguf.Keys.General.FILE_TYPE] = (int(gguf.LlamaFileType.MOSTLY_F16), gguf.GGUFValueType.UINT32)
    with atomic_path(Path(target)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=False)
        gguf_io.copy_metadata(reader, writer, skip=set(overrides), overrides=overrides)
        # Tensor infos first (shapes and types are known without computing anything), then data in order.
        for t in reader.tensors:
            dtype, nbytes = _storage_type(t)
            writer.add_tensor_info(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), dtype, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(reader.tensors)
        try:
            for i, t in enumerate(reader.tensors):
                array = gguf_io.tensor_to_float32(t)
                lora = tensors.get(t.name)
                if lora is not None:
                    array = array + (np.float32(lora.scale) * lora.b.astype(np.float32)) @ lora.a.astype(
                        np.float32
                    )
                writer.write_tensor_data(np.ascontiguousarray(array.astype(_storage_type(t)[0], copy=False)))
                yield i + 1, total
        finally:
            writer.close()


def merge_to_f16(
    base: str | os.PathLike,
    target: str | os.PathLike,
    tensors: dict[str, LoraTensor],
    *,
    metadata: dict[str, tuple[Any, gguf.GGUFValueType]],
    reader: gguf.GGUFReader | None = None,
) -> Path:
    """`merge_steps` run to the end; returns `target`."""
    for _ in merge_steps(base, target, tensors, metadata=metadata, reader=reader):
        pass
    return Path(target)
