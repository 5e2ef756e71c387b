import gguf
import numpy as np
import pytest

from mipo_local import gguf_io
from mipo_local.errors import ModelError


def test_read_info_of_default_model(default_source_gguf):
    info = gguf_io.read_info(default_source_gguf)
    assert info.architecture == "llama"
    assert info.n_layers == 30 and info.n_embd == 576
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert 130e6 < info.n_params < 140e6


def test_dequantized_copy_keeps_every_key_and_matches_values(default_source_gguf, default_f16_gguf):
    src, dst = gguf.GGUFReader(default_source_gguf), gguf.GGUFReader(default_f16_gguf)
    src_keys = {k for k in src.fields if not k.startswith("GGUF.")}
    dst_keys = {k for k in dst.fields if not k.startswith("GGUF.")}
    assert src_keys == dst_keys
    for key in src_keys - {"general.file_type"}:
        assert src.fields[key].contents() == dst.fields[key].contents(), key
    assert dst.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    a = next(t for t in src.tensors if t.name == "blk.0.attn_q.weight")
    b = next(t for t in dst.tensors if t.name == "blk.0.attn_q.weight")
    assert b.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_allclose(gguf_io.tensor_to_float32(a), gguf_io.tensor_to_float32(b), atol=2e-3)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        gguf_io.read_info(tmp_path / "none.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am not a model")
    with pytest.raises(ModelError, match="not a GGUF file"):
        gguf_io.read_info(bad)


def test_truncated_gguf(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated|damaged"):
        gguf_io.read_info(cut)


def test_unsupported_architecture_lists_supported(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="'mamba'.*supported: llama, qwen2, qwen3, gemma3"):
        gguf_io.read_info(path)
