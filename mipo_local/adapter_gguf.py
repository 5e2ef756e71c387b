"""Write the trained LoRA as a GGUF adapter: what `llama-cli --lora`, llama-cpp-python's `lora_path` and
Ollama's `ADAPTER` load on top of the base model.

llama.cpp reads `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each base
tensor `<name>` the pair `<name>.lora_a` (ggml ne = [in, rank]) and `<name>.lora_b` (ne = [rank, out]),
i.e. numpy shapes (rank, in) and (out, rank): exactly adapter_io's layout. It scales by alpha / rank itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import gguf_io
from .adapter_io import AdapterFile
from .errors import ExportError
from .fsutil import atomic_path
from .merge import check_lora

LORA_A_SUFFIX = ".lora_a"
LORA_B_SUFFIX = ".lora_b"


def adapter_bytes(adapter: AdapterFile) -> int:
    """Size of the adapter's tensor data as written (float32)."""
    return sum(4 * (t.a.size + t.b.size) for t in adapter.tensors.values())


def write_adapter_gguf(
    base: str | os.PathLike,
    target: str | os.PathLike,
    adapter: AdapterFile,
    *,
    metadata: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    reader: gguf.GGUFReader | None = None,
) -> Path:
    """Write `adapter` as a GGUF LoRA adapter for the base model `base`, atomically.

    Tensors stay float32: they are small (a few MB at rank 8) and llama.cpp then adds exactly the
    trained deltas. `metadata` adds keys (provenance); `reader` is one already open on `base`.

    Raises:
        ExportError: a LoRA tensor does not fit the base model.
    """
    reader = reader or gguf_io.open_reader(base)
    check_lora(adapter.tensors, reader, Path(base))
    arch = gguf_io.field_value(reader, gguf.Keys.General.ARCHITECTURE)
    base_name = gguf_io.field_value(reader, gguf.Keys.General.NAME)
    target = Path(target)
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=False)
        writer.add_type(gguf.GGUFType.ADAPTER)
        if base_name:
            writer.add_name(f"{base_name} LoRA")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales the delta by alpha / rank, the same scale training used.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        for key, (value, vtype) in (metadata or {}).items():
            writer.add_key_value(key, value, vtype)
        for name in sorted(adapter.tensors, key=_tensor_order(reader)):
            lora = adapter.tensors[name]
            _check_scale(name, lora.scale, adapter)
            writer.add_tensor(name + LORA_A_SUFFIX, np.ascontiguousarray(lora.a, dtype=np.float32))
            writer.add_tensor(name + LORA_B_SUFFIX, np.ascontiguousarray(lora.b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def _tensor_order(reader: gguf.GGUFReader):
    """Base-file order, so the adapter lists tensors the way the model does."""
    index = {t.name: i for i, t in enumerate(reader.tensors)}
    return lambda name: index.get(name, len(index))


def _check_scale(name: str, scale: float, adapter: AdapterFile) -> None:
    # One alpha for the whole file: llama.cpp cannot express per-tensor scales.
    rank = adapter.tensors[name].a.shape[0]
    if not np.isclose(scale, adapter.alpha / rank, rtol=1e-6):
        raise ExportError(
            f"The LoRA weights for '{name}' use the scale {scale}, not alpha / rank = {adapter.alpha / rank}; "
            "a GGUF adapter cannot hold per-tensor scales."
        )
