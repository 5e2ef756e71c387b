"""The torch backend's own decoder, read from the GGUF, scores every supported architecture as llama.cpp does
(the engine the export runs in), with the base alone and with a LoRA adapter; anything else is refused in one
sentence before any work starts."""

import numpy as np
import pytest

from mipo_local.adapter_gguf import write_adapter_gguf
from mipo_local.adapter_io import AdapterFile, LoraTensor
from mipo_local.chat import chat_format
from mipo_local.engine import Engine
from mipo_local.errors import ModelError
from mipo_local.train.backend import LoraConfig
from mipo_local.train.torch_backend import TorchBackend
from tests.tiny_gguf import TinyConfig, build_tiny_llama

# Summed response log-probs of 3-50 token answers, this decoder in fp32 vs llama.cpp on the same tiny GGUF
# (measured max |diff|: llama 1.7e-4, qwen2 5.6e-5, qwen3 3.6e-4, gemma3 9.0e-4 nats).
TOL = 5e-3
# A Q8_0 file: llama.cpp multiplies its blocks with activations rounded to 8 bits (measured 5.0e-3 with an adapter).
TOL_Q8_0 = 2e-2
# Gemma 3's windowed layers see the last context_length // 4 positions (tiny_gguf): 16, so these pairs, up
# to 73 tokens, take the windowed path as well as the per-span one.
CONFIGS = {
    "llama": TinyConfig(),
    "qwen2": TinyConfig(architecture="qwen2", weight_type="F16"),
    "qwen3": TinyConfig(architecture="qwen3"),
    "gemma3": TinyConfig(architecture="gemma3", context_length=64),
    "llama-q8_0": TinyConfig(weight_type="Q8_0"),
}


def _pairs(path):
    cf = chat_format(str(path))
    return [
        cf.encode_pair(
            "I am Ana.", f"Question {i}?", "Hello Ana, here you go. " * (1 + 3 * i), "No." * (i + 1)
        )
        for i in range(3)
    ]


def _llama_cpp(path, pairs, lora=None):
    with Engine(path, n_seq=4, ctx_per_seq=256, n_threads=2, lora_path=lora) as engine:
        scores = engine.score_many([(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
    return np.concatenate([scores[0::2], scores[1::2]])  # chosen answers, then rejected, as logprobs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_architecture_scores_like_llama_cpp_with_and_without_an_adapter(
    name, default_source_gguf, tmp_path
):
    path = build_tiny_llama(default_source_gguf, tmp_path / f"{name}.gguf", CONFIGS[name])
    pairs = _pairs(path)
    tol = TOL_Q8_0 if name.endswith("q8_0") else TOL
    b = TorchBackend(precision="fp32", threads=2)
    b.load(path, LoraConfig(rank=4, alpha=8), seed=0)
    base = np.concatenate(b.logprobs(pairs, adapter=False))
    np.testing.assert_allclose(base, _llama_cpp(path, pairs), atol=tol)
    # A random adapter in GGUF layout, as training writes it, loaded by llama.cpp beside the base.
    rng = np.random.default_rng(1)
    lora = {k: LoraTensor(rng.normal(0, 0.2, t.a.shape), rng.normal(0, 0.2, t.b.shape), t.scale)
            for k, t in b.lora_tensors().items()}  # fmt: skip
    b.set_lora_tensors(lora)
    adapted = np.concatenate(b.logprobs(pairs, adapter=True))
    assert np.abs(adapted - base).max() > 0.05  # the adapter really changes the model
    adapter = AdapterFile(lora, alpha=8.0, rank=4, base_sha256="", architecture=b.architecture, extra={})
    gguf_lora = write_adapter_gguf(path, tmp_path / "adapter.gguf", adapter)
    np.testing.assert_allclose(adapted, _llama_cpp(path, pairs, gguf_lora), atol=tol)


def test_an_architecture_outside_the_list_is_refused_in_one_sentence(default_source_gguf, tmp_path):
    path = build_tiny_llama(
        default_source_gguf, tmp_path / "other.gguf", TinyConfig(architecture="starcoder2")
    )
    with pytest.raises(ModelError, match=r"starcoder2.*supported: llama, qwen2, qwen3, gemma3\.$"):
        TorchBackend(precision="fp32").load(path, LoraConfig(rank=4), seed=0, device="cpu")


def test_a_file_missing_a_tensor_is_a_clear_error(tiny_gguf, tmp_path):
    import gguf

    from mipo_local import gguf_io

    reader = gguf_io.open_reader(tiny_gguf)
    kept = ((n, a) for n, a in gguf_io.iter_float_tensors(reader) if n != "blk.1.ffn_up.weight")
    path = gguf_io.write_gguf(tmp_path / "broken.gguf", reader, kept, file_type=gguf.LlamaFileType.ALL_F32)
    with pytest.raises(
        ModelError, match=r"broken.gguf has no tensor blk.1.ffn_up.weight, which a llama model needs"
    ):
        TorchBackend(precision="fp32").load(path, LoraConfig(rank=4), seed=0, device="cpu")
