"""The torch backend on the tiny model: base log-probs, LoRA layout in GGUF terms, training signal."""

import gguf
import numpy as np
import pytest

from mipo_local import gguf_io
from mipo_local.chat import chat_format
from mipo_local.engine import Engine
from mipo_local.train.backend import LoraConfig, LoraTensor, PairBatch
from mipo_local.train.torch_backend import TorchBackend, gguf_permute_rows, gguf_unpermute_rows

# Measured: torch fp32 vs llama.cpp summed log-probs on the tiny model differ by < 1e-4 nats;
# on the default model (F16 weights) by about 0.03 nats over ~50 tokens.
TOL = 1e-3


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    return b


@pytest.fixture(scope="module")
def pairs(tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    return [
        cf.encode_pair("I am Ana.", f"Question {i}?", "Hello Ana, here you go.", "No." * (i + 1))
        for i in range(3)
    ]


def _llama_scores(path, pairs):
    with Engine(path, n_seq=4, ctx_per_seq=256, n_threads=2) as eng:
        s = eng.score_many([(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
    return np.array(s[0::2]), np.array(s[1::2])


def test_permutation_round_trip():
    w = np.arange(8 * 12 * 3, dtype=np.float32).reshape(24, 12)
    assert np.array_equal(gguf_unpermute_rows(gguf_permute_rows(w, 4), 4), w)
    assert not np.array_equal(gguf_permute_rows(w, 4), w)


def test_base_logprobs_match_llama_cpp(backend, pairs, tiny_gguf):
    c, r = backend.logprobs(pairs, adapter=False)
    lc, lr = _llama_scores(tiny_gguf, pairs)
    np.testing.assert_allclose(c, lc, atol=TOL)
    np.testing.assert_allclose(r, lr, atol=TOL)


def test_lora_tensors_in_gguf_layout_reproduce_the_policy_in_llama_cpp(backend, pairs, tiny_gguf, tmp_path):
    rng = np.random.default_rng(1)
    current = backend.lora_tensors()
    random = {
        k: LoraTensor(rng.normal(0, 0.2, t.a.shape), rng.normal(0, 0.2, t.b.shape), t.scale)
        for k, t in current.items()
    }
    backend.set_lora_tensors(random)
    got = backend.lora_tensors()
    for k in random:
        np.testing.assert_allclose(got[k].b, random[k].b, rtol=1e-6)
    # Merge scale * b @ a into the GGUF tensors by hand and let llama.cpp score the merged file.
    reader = gguf_io.open_reader(tiny_gguf)

    def merged():
        for name, arr in gguf_io.iter_float_tensors(reader):
            if name in random:
                t = random[name]
                arr = arr + t.scale * (t.b @ t.a)
            yield name, arr.astype(np.float32)

    out = gguf_io.write_gguf(tmp_path / "merged.gguf", reader, merged(), file_type=gguf.LlamaFileType.ALL_F32)
    c, r = backend.logprobs(pairs, adapter=True)
    lc, lr = _llama_scores(out, pairs)
    base_c, _ = backend.logprobs(pairs, adapter=False)
    assert np.abs(c - base_c).max() > 0.05  # the adapter really changes the model
    np.testing.assert_allclose(c, lc, atol=TOL)
    np.testing.assert_allclose(r, lr, atol=TOL)


def test_steps_raise_the_reward_margin(tiny_gguf, pairs):
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    ref_c, ref_r = b.logprobs(pairs, adapter=False)
    batch = PairBatch(pairs, ref_c, ref_r)
    first = b.accumulate(batch, beta=0.1, loss_scale=1.0)
    b.optimizer_step(1e-2)
    for _ in range(4):
        last = b.accumulate(batch, beta=0.1, loss_scale=1.0)
        b.optimizer_step(1e-2)
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)  # B starts at zero: policy == reference
    assert last["loss"] < first["loss"] and last["margin"] > 0
