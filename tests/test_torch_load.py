"""The torch backend's own GGUF loader gives exactly the model transformers' loader gives, at less memory."""

import pytest
import torch

from mipo_local.errors import ModelError
from mipo_local.train.backend import LoraConfig
from mipo_local.train.torch_backend import TorchBackend
from mipo_local.train.torch_load import load_causal_lm
from tests.tiny_gguf import TinyConfig, build_tiny_llama


def _transformers_model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
    )


def _assert_same(ours, theirs):
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for name, t in ref.items():
        assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
    buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():  # rotary frequencies, gemma's embedding scale
        assert torch.equal(b, buffers[name]), name
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # still tied
    assert not ours.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_weights_as_transformers_llama(tiny_gguf, tiny_gguf_q8, dtype):
    """llama's q/k rows are un-permuted as transformers does it; F32 and Q8_0 files."""
    for path in (tiny_gguf, tiny_gguf_q8):
        _assert_same(load_causal_lm(path, dtype), _transformers_model(path, dtype))


def test_same_weights_as_transformers_qwen2(tmp_path, default_source_gguf):
    """Another architecture (q/k/v biases, no q/k permutation), F16 matrices."""
    path = build_tiny_llama(
        default_source_gguf, tmp_path / "qwen2.gguf", TinyConfig(architecture="qwen2", weight_type="F16")
    )
    _assert_same(load_causal_lm(path, torch.bfloat16), _transformers_model(path, torch.bfloat16))


def test_a_config_transformers_misreads_is_a_clear_error(tmp_path, default_source_gguf):
    """transformers reads no head_dim from a qwen3 GGUF (it takes 128): the shapes disagree, said plainly."""
    path = build_tiny_llama(default_source_gguf, tmp_path / "qwen3.gguf", TinyConfig(architecture="qwen3"))
    with pytest.raises(ModelError, match="in the file but"):
        TorchBackend(precision="fp32").load(path, LoraConfig(rank=4), seed=0, device="cpu")
