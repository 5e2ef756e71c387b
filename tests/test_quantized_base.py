"""A base in a K-quant (what Ollama and most hubs ship): training dequantizes it, the export quantizes the
merged model afresh, and the fidelity check compares against the base quantized again the same way."""

import gguf

from mipo_local import gguf_io, modelsource, quantize
from mipo_local.export import ExportSettings, export
from mipo_local.progress import Log
from mipo_local.train.loop import train
from mipo_local.workspace import Workspace
from tests.test_export import drain
from tests.tiny_gguf import TinyConfig, build_tiny_llama
from tests.trainhelp import FAST, drive, insert_pairs, signal_pairs


def test_a_q4_k_m_base_trains_exports_and_passes_the_fidelity_check(ws_dir, default_source_gguf, tmp_path):
    # 256 wide: the narrowest rows K-quants take (the 64-wide fixture would fall back to other types).
    f16 = build_tiny_llama(
        default_source_gguf, tmp_path / "f16.gguf", TinyConfig(n_embd=256, n_ff=512, weight_type="F16")
    )
    base = quantize.quantize(f16, tmp_path / "tiny-Q4_K_M.gguf", "q4_k_m", threads=2)
    kinds = {t.tensor_type.name for t in gguf_io.open_reader(base).tensors if len(t.shape) == 2}
    assert "Q4_K" in kinds and kinds <= {"Q4_K", "Q6_K"}, kinds
    ws = Workspace.open(ws_dir, create=True)
    modelsource.set_base_model(ws, str(base))
    ws.add_context("I am Ana, a pirate fan. Greet me with Ahoy.")
    insert_pairs(ws, signal_pairs(30))

    summary, events = drive(train(ws, FAST))
    assert summary.steps > 0 and summary.heldout_pairs >= 2
    warnings = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert warnings == []  # the held-out pairs were pre-scored in llama.cpp for the check

    _, merged = drain(export(ws, None, ExportSettings(threads=2), tmp_path / "merged"))
    assert merged.quant == "q8_0" and merged.warnings == []  # auto: Q8_0 under 1B parameters
    out = gguf_io.open_reader(merged.path)
    assert gguf_io.field_value(out, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_Q8_0
    fid = merged.fidelity
    assert fid["ok"] and fid["pairs"] == summary.heldout_pairs and fid["sign_agreement"] >= 0.95, fid

    _, adapter = drain(export(ws, None, ExportSettings(threads=2, adapter_only=True), tmp_path / "adapter"))
    assert adapter.kind == "adapter" and adapter.fidelity["ok"], adapter.fidelity
    ws.close()
