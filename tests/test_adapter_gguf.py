"""The GGUF LoRA adapter: its format read back with gguf-py, and llama.cpp applying it like the merged model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mipo_local import gguf_io, merge
from mipo_local.adapter_gguf import write_adapter_gguf
from mipo_local.adapter_io import AdapterFile
from mipo_local.chat import chat_format
from mipo_local.engine import log_softmax
from mipo_local.errors import ExportError
from mipo_local.llama_loader import load_llama
from mipo_local.train.backend import LoraTensor
from tests.exporthelp import random_lora

RANK, ALPHA = 4, 8.0
# Largest next-token log-prob difference (nats, whole vocabulary) between base + adapter and the merged
# F16 file, as measured on the tiny models. F32 base: 3.3e-4 (3.8e-4 with twice the LoRA magnitude), what
# rounding the merged weights to F16 costs. Q8_0 base: 4.3e-3, because llama.cpp's Q8_0 matmul also
# quantizes the activations, which the merged F16 file does not. The adapter itself moves the same
# log-probs by 0.5 nats or more.
TOLERANCE = {"tiny_gguf": 2e-3, "tiny_gguf_q8": 1e-2}


def _adapter(base, reader=None) -> AdapterFile:
    return AdapterFile(random_lora(base, rank=RANK, alpha=ALPHA, reader=reader), ALPHA, RANK, "", "llama", {})


def test_adapter_gguf_format(tiny_gguf, tmp_path):
    reader = gguf_io.open_reader(tiny_gguf)
    adapter = _adapter(tiny_gguf, reader)
    meta = merge.provenance(base_sha256="abc", run_name="run-1", run_settings={"rank": RANK})
    path = write_adapter_gguf(tiny_gguf, tmp_path / "a.gguf", adapter, metadata=meta, reader=reader)
    r = gguf.GGUFReader(path)

    def value(key):
        return r.get_field(key).contents()

    assert value(gguf.Keys.General.TYPE) == gguf.GGUFType.ADAPTER
    assert value(gguf.Keys.General.ARCHITECTURE) == "llama"
    assert value(gguf.Keys.Adapter.TYPE) == "lora"
    assert value(gguf.Keys.Adapter.LORA_ALPHA) == pytest.approx(ALPHA)
    assert value("mipo_local.run") == "run-1"
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * len(adapter.tensors) == 2 * 2 * 7
    for name, lora in adapter.tensors.items():
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        # ggml order: lora_a ne = [in, rank], lora_b ne = [rank, out]
        assert list(a.shape) == [lora.a.shape[1], RANK] and list(b.shape) == [RANK, lora.b.shape[0]]
        assert a.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(a.data).reshape(lora.a.shape), lora.a)
        np.testing.assert_array_equal(np.asarray(b.data).reshape(lora.b.shape), lora.b)


def _next_token_logprobs(model, tokens, lora=None) -> np.ndarray:
    llm = load_llama(model, n_ctx=256, n_threads=2, logits_all=True, lora_path=str(lora) if lora else None)
    try:
        llm.eval(tokens)
        return log_softmax(np.array(llm.scores[len(tokens) - 1]))
    finally:
        llm.close()


@pytest.mark.parametrize("base_fixture", ["tiny_gguf", "tiny_gguf_q8"])
def test_base_plus_adapter_matches_merged_f16_in_llama_cpp(base_fixture, request, tmp_path):
    base = request.getfixturevalue(base_fixture)
    reader = gguf_io.open_reader(base)
    adapter = _adapter(base, reader)
    adapter_path = write_adapter_gguf(base, tmp_path / "adapter.gguf", adapter, reader=reader)
    merged_path = merge.merge_to_f16(
        base, tmp_path / "merged.gguf", adapter.tensors, metadata={}, reader=reader
    )
    tokens = chat_format(str(base)).prompt_ids("I am Ana, a vegan chef.", "What should I cook tonight?")

    with_adapter = _next_token_logprobs(base, tokens, adapter_path)
    merged = _next_token_logprobs(merged_path, tokens)
    alone = _next_token_logprobs(base, tokens)
    tolerance = TOLERANCE[base_fixture]
    assert np.abs(with_adapter - merged).max() < tolerance
    assert np.abs(alone - with_adapter).max() > 30 * tolerance  # the adapter really changes the model


def test_adapter_that_does_not_fit_the_base_is_refused(tiny_gguf, tmp_path):
    reader = gguf_io.open_reader(tiny_gguf)
    good = _adapter(tiny_gguf, reader)
    name = next(iter(good.tensors))
    wrong_shape = dict(good.tensors)
    wrong_shape[name] = LoraTensor(good.tensors[name].a[:, :10], good.tensors[name].b, ALPHA / RANK)
    unknown = {**good.tensors, "blk.9.attn_q.weight": good.tensors[name]}
    for tensors, why in ((wrong_shape, "do not fit"), (unknown, "lacks")):
        with pytest.raises(ExportError, match=why):
            adapter = AdapterFile(tensors, ALPHA, RANK, "", "llama", {})
            write_adapter_gguf(tiny_gguf, tmp_path / "a.gguf", adapter, reader=reader)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
