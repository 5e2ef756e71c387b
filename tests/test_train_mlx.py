"""The MLX backend on tiny GGUF models: loading (QLoRA on Q8_0), parity with llama.cpp and torch, training,
checkpoints and the LoRA tensors' GGUF layout.

Measured on this machine (summed log-probs of ~8-30 token responses, MLX fp32 on the CPU):
- MLX vs llama.cpp, base model: tiny F32 < 3e-4 nats, tiny Q8_0 < 5e-3 (llama.cpp multiplies Q8_0 weights
  with 8-bit quantized activations, MLX with fp32 ones), "sharp" tiny models (weights std 0.1) of every
  architecture < 4e-3, while a wrong q/k row order there is off by about 1 nat;
- MLX vs torch, base model: < 5e-5 nats (both compute in fp32 from the same dequantized values);
- MLX vs torch, DPO loss: relative difference < 1e-6; LoRA gradients: cosine similarity > 0.99999.
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402

from mipo_local import gguf_io  # noqa: E402
from mipo_local.chat import chat_format  # noqa: E402
from mipo_local.engine import Engine  # noqa: E402
from mipo_local.errors import TrainingError  # noqa: E402
from mipo_local.train import mlx_model  # noqa: E402
from mipo_local.train.backend import LoraConfig, LoraTensor, PairBatch  # noqa: E402
from mipo_local.train.mlx_backend import MLXBackend  # noqa: E402
from tests.tiny_gguf import TinyConfig, build_tiny_llama  # noqa: E402

pytestmark = pytest.mark.mlx

TOL = {"f32": 1e-3, "q8": 1e-2, "sharp": 1e-2}
LORA = LoraConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def models(tiny_gguf, tiny_gguf_q8):
    return {"f32": tiny_gguf, "q8": tiny_gguf_q8}


@pytest.fixture(scope="module")
def pairs(tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    return [
        cf.encode_pair("I am Ana.", f"Question {i}?", "Hello Ana, here you go.", "No." * (i + 1))
        for i in range(4)
    ]


def _mlx(path, seed=0) -> MLXBackend:
    b = MLXBackend(precision="fp32")
    b.load(path, LORA, seed=seed, device="cpu")
    return b


def _llama_scores(path, pairs):
    with Engine(path, n_seq=4, ctx_per_seq=256, n_threads=2) as eng:
        s = np.array(eng.score_many([(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]))
    return s[0::2], s[1::2]


def _random_lora(backend, seed=7, std=0.1) -> dict[str, LoraTensor]:
    rng = np.random.default_rng(seed)
    return {
        k: LoraTensor(
            rng.normal(0, std, t.a.shape).astype(np.float32),
            rng.normal(0, std, t.b.shape).astype(np.float32),
            t.scale,
        )
        for k, t in backend.lora_tensors().items()
    }


# -- loading -------------------------------------------------------------------------------------------


def test_block_quants_repack_bit_exactly_like_mx_load(tiny_gguf_q8, default_source_gguf, tmp_path):
    """The loader's own repacking (used for files mx.load refuses) equals MLX's for Q4_0, Q4_1 and Q8_0."""
    q4_0 = build_tiny_llama(default_source_gguf, tmp_path / "q4_0.gguf", TinyConfig(weight_type="Q4_0"))
    seen = set()
    for path in (tiny_gguf_q8, q4_0, default_source_gguf):  # the default model ships Q4_1 + Q8_0
        reference = mx.load(str(path))
        for t in gguf_io.open_reader(path).tensors:
            if t.tensor_type not in mlx_model.KEPT_QUANTIZED:
                continue
            seen.add(t.tensor_type.name)
            stem = t.name.removesuffix(".weight")
            for mine, key in zip(
                mlx_model._repack_block_quants(t), (t.name, f"{stem}.scales", f"{stem}.biases"), strict=True
            ):
                theirs = np.array(reference[key])
                assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, key
                assert np.array_equal(mine.view(np.uint8), theirs.view(np.uint8)), key
    assert seen == {"Q4_0", "Q4_1", "Q8_0"}


def test_q8_0_weights_stay_quantized(tiny_gguf_q8):
    import mlx.nn as nn

    b = _mlx(tiny_gguf_q8)
    attn = b.model.layers[0].self_attn
    assert isinstance(attn.q_proj.linear, nn.QuantizedLinear) and attn.q_proj.linear.bits == 8
    assert isinstance(b.model.model.embed_tokens, nn.QuantizedEmbedding)
    trainable = {k for k, _ in tree_flatten(b.model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)


# -- base log-probs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_base_logprobs_match_llama_cpp(kind, models, pairs):
    c, r = _mlx(models[kind]).logprobs(pairs, adapter=False)
    lc, lr = _llama_scores(models[kind], pairs)
    np.testing.assert_allclose(c, lc, atol=TOL[kind])
    np.testing.assert_allclose(r, lr, atol=TOL[kind])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_every_architecture_matches_llama_cpp(arch, default_source_gguf, tmp_path, pairs):
    """Weights with std 0.1 make attention sharp, so a wrong name, norm or q/k row order shows (~1 nat)."""
    cfg = TinyConfig(architecture=arch, std=0.1)
    if arch == "gemma3":  # Gemma 3 has one global layer per 6; a 16-token window makes the local ones matter
        cfg = TinyConfig(architecture=arch, std=0.1, n_layers=6, context_length=64)
    path = build_tiny_llama(default_source_gguf, tmp_path / f"{arch}.gguf", cfg)
    c, r = _mlx(path).logprobs(pairs, adapter=False)
    lc, lr = _llama_scores(path, pairs)
    np.testing.assert_allclose(c, lc, atol=TOL["sharp"])
    np.testing.assert_allclose(r, lr, atol=TOL["sharp"])


def test_mixed_quant_types_are_dequantized_where_mlx_cannot_keep_them(tiny_gguf, tmp_path, pairs):
    """A file with Q5_0 (which mx.load refuses) loads through the per-tensor path: Q8_0 kept, Q5_0 dequantized."""
    import mlx.nn as nn

    reader = gguf_io.open_reader(tiny_gguf)
    target = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(target, "llama", use_temp_file=False)
    gguf_io.copy_metadata(reader, writer)
    for t in reader.tensors:
        array = gguf_io.tensor_to_float32(t)
        qtype = gguf.GGMLQuantizationType.Q5_0 if ".attn_" in t.name else gguf.GGMLQuantizationType.Q8_0
        if array.ndim == 1:
            writer.add_tensor(t.name, array)
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    b = _mlx(target)
    assert isinstance(b.model.layers[0].mlp.up_proj.linear, nn.QuantizedLinear)
    assert type(b.model.layers[0].self_attn.q_proj.linear) is nn.Linear
    c, r = b.logprobs(pairs, adapter=False)
    lc, lr = _llama_scores(target, pairs)
    np.testing.assert_allclose(c, lc, atol=TOL["q8"])
    np.testing.assert_allclose(r, lr, atol=TOL["q8"])


# -- LoRA: reference, layout, training ------------------------------------------------------------------------


def test_adapter_off_is_the_base_and_lora_tensors_reproduce_the_policy_in_llama_cpp(
    tiny_gguf, pairs, tmp_path
):
    b = _mlx(tiny_gguf)
    base_c, base_r = b.logprobs(pairs, adapter=False)
    fresh_c, _ = b.logprobs(pairs, adapter=True)
    np.testing.assert_allclose(fresh_c, base_c, atol=1e-6)  # b starts at zero: policy == reference
    lora = _random_lora(b, std=0.2)
    b.set_lora_tensors(lora)
    got = b.lora_tensors()
    assert (
        set(got)
        == set(lora)
        == {gguf_io.tensor_name(gguf_io.LORA_TARGET_TENSORS[k], i) for i in range(2) for k in LORA.targets}
    )
    for k, t in lora.items():
        np.testing.assert_array_equal(got[k].a, t.a)
        np.testing.assert_array_equal(got[k].b, t.b)
        assert got[k].scale == LORA.scale == 2.0
    # The reference is the same weights with LoRA switched off, unchanged by the adapter.
    off_c, off_r = b.logprobs(pairs, adapter=False)
    np.testing.assert_allclose(off_c, base_c, atol=1e-6)
    np.testing.assert_allclose(off_r, base_r, atol=1e-6)
    # Merge scale * b @ a into the GGUF's own tensors by hand and let llama.cpp score the merged file.
    src = gguf_io.open_reader(tiny_gguf)

    def merged():
        for name, arr in gguf_io.iter_float_tensors(src):
            if name in lora:
                arr = arr + lora[name].scale * (lora[name].b @ lora[name].a)
            yield name, arr.astype(np.float32)

    out = gguf_io.write_gguf(tmp_path / "merged.gguf", src, merged(), file_type=gguf.LlamaFileType.ALL_F32)
    c, r = b.logprobs(pairs, adapter=True)
    lc, lr = _llama_scores(out, pairs)
    assert np.abs(c - base_c).max() > 0.05  # the adapter really changes the model
    np.testing.assert_allclose(c, lc, atol=TOL["f32"])
    np.testing.assert_allclose(r, lr, atol=TOL["f32"])


def test_steps_decrease_the_loss_with_gradient_accumulation(tiny_gguf, pairs):
    b = _mlx(tiny_gguf)
    ref_c, ref_r = b.logprobs(pairs, adapter=False)
    halves = [PairBatch(pairs[i : i + 2], ref_c[i : i + 2], ref_r[i : i + 2]) for i in (0, 2)]
    losses = []
    for _ in range(5):
        losses.append(np.mean([b.accumulate(h, beta=0.1, loss_scale=0.5)["loss"] for h in halves]))
        b.optimizer_step(1e-2)
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.05 and bool(np.all(np.diff(losses) < 0))


def test_accumulated_micro_batches_equal_one_batch(tiny_gguf, pairs):
    one, two = _mlx(tiny_gguf), _mlx(tiny_gguf)
    init = _random_lora(one)
    one.set_lora_tensors(init)
    two.set_lora_tensors(init)
    ref_c, ref_r = one.logprobs(pairs, adapter=False)
    one.accumulate(PairBatch(pairs, ref_c, ref_r), beta=0.1, loss_scale=1.0)
    for i in (0, 2):
        two.accumulate(
            PairBatch(pairs[i : i + 2], ref_c[i : i + 2], ref_r[i : i + 2]), beta=0.1, loss_scale=0.5
        )
    g1, g2 = one.lora_gradients(), two.lora_gradients()
    for k in g1:
        np.testing.assert_allclose(g2[k].a, g1[k].a, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(g2[k].b, g1[k].b, rtol=1e-4, atol=1e-8)


# -- parity with the torch backend ------------------------------------------------------------------------------


def _torch_gradients(backend) -> dict[str, LoraTensor]:
    """The torch backend's LoRA gradients in GGUF layout, through its own lora_tensors (grads swapped in)."""
    import torch

    saved = [p.detach().clone() for p in backend.params]
    with torch.no_grad():
        for p in backend.params:
            p.copy_(p.grad)
    try:  # copies: torch's lora_tensors may hand out views of the live parameters
        return {k: LoraTensor(t.a.copy(), t.b.copy(), t.scale) for k, t in backend.lora_tensors().items()}
    finally:
        with torch.no_grad():
            for p, s in zip(backend.params, saved, strict=True):
                p.copy_(s)


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("kind", ["f32", "q8"])
def test_same_init_same_batch_gives_the_torch_backends_loss_and_gradients(kind, models, pairs):
    pytest.importorskip("torch")
    from mipo_local.train.torch_backend import TorchBackend

    mlx_b = _mlx(models[kind])
    torch_b = TorchBackend(precision="fp32", threads=2)
    torch_b.load(models[kind], LORA, seed=0, device="cpu")
    # The base log-probs of both backends agree (both fp32, same dequantized weights).
    base_mlx, base_torch = mlx_b.logprobs(pairs, adapter=False), torch_b.logprobs(pairs, adapter=False)
    np.testing.assert_allclose(base_mlx, base_torch, atol=2e-4)
    init = _random_lora(mlx_b)
    mlx_b.set_lora_tensors(init)
    torch_b.set_lora_tensors(init)
    ref_c, ref_r = base_mlx
    # The second pair of the second micro-batch also carries its rejected answer under another context.
    cf = chat_format(str(models[kind]))
    other = dataclasses.replace(
        pairs[2], anchor_prompt=cf.prompt_ids("I like boats.", "Question 2?"),
        anchor_response=cf.response_ids("I like boats.", "Question 2?", "No." * 3),
    )  # fmt: skip
    for i in (0, 2):  # two micro-batches accumulated into one step; the second with both anchors on
        batch = PairBatch([other, pairs[3]] if i else pairs[:2], ref_c[i : i + 2], ref_r[i : i + 2])
        sft, kl_weight = (0.5, 5.0) if i else (0.0, 0.0)
        m_mlx = mlx_b.accumulate(batch, beta=0.1, loss_scale=0.5, sft_weight=sft, kl_weight=kl_weight)
        m_torch = torch_b.accumulate(batch, beta=0.1, loss_scale=0.5, sft_weight=sft, kl_weight=kl_weight)
        assert abs(m_mlx["loss"] - np.log(2)) > 1e-3  # the random LoRA moved the policy off the reference
        assert abs(m_mlx["loss"] - m_torch["loss"]) / m_torch["loss"] < 1e-4
        assert m_mlx["margin"] == pytest.approx(m_torch["margin"], rel=1e-3, abs=1e-6)
        if kl_weight:
            assert m_mlx["other_kl"] > 1e-4 and m_mlx["other_kl"] == pytest.approx(
                m_torch["other_kl"], rel=1e-3
            )
    g_mlx, g_torch = mlx_b.lora_gradients(), _torch_gradients(torch_b)
    assert set(g_mlx) == set(g_torch) == set(init)
    for name in g_mlx:
        assert _cosine(g_mlx[name].a, g_torch[name].a) > 0.999, name
        assert _cosine(g_mlx[name].b, g_torch[name].b) > 0.999, name
    norm_mlx, norm_torch = mlx_b.optimizer_step(1e-3), torch_b.optimizer_step(1e-3)
    assert norm_mlx == pytest.approx(norm_torch, rel=1e-3)


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_save_and_load_state_continue_exactly(tiny_gguf, pairs, tmp_path):
    def steps(backend, n):
        for _ in range(n):
            backend.accumulate(batch, beta=0.1, loss_scale=1.0)
            backend.optimizer_step(1e-2)

    first = _mlx(tiny_gguf)
    batch = PairBatch(pairs, *first.logprobs(pairs, adapter=False))
    steps(first, 2)
    ck = tmp_path / "ck"
    ck.mkdir()
    first.save(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["backend.json", "backend.safetensors"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in ck.iterdir())
    steps(first, 2)
    resumed = _mlx(tiny_gguf, seed=5)  # another init: everything must come from the checkpoint
    resumed.load_state(ck)
    steps(resumed, 2)
    want, got = first.lora_tensors(), resumed.lora_tensors()
    for k in want:
        np.testing.assert_allclose(got[k].a, want[k].a, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[k].b, want[k].b, rtol=1e-6, atol=1e-9)


def test_damaged_or_foreign_checkpoints_are_refused(tiny_gguf, tmp_path):
    b = _mlx(tiny_gguf)
    ck = tmp_path / "ck"
    ck.mkdir()
    b.save(ck)
    data = (ck / "backend.safetensors").read_bytes()
    (ck / "backend.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match="damaged"):
        b.load_state(ck)
    (ck / "backend.safetensors").write_bytes(data)
    meta = json.loads((ck / "backend.json").read_text())
    (ck / "backend.json").write_text(json.dumps({**meta, "backend": "torch"}))
    with pytest.raises(TrainingError, match="torch backend"):
        b.load_state(ck)
    other = MLXBackend(precision="fp32")
    other.load(tiny_gguf, LoraConfig(rank=2, alpha=4), seed=0, device="cpu")
    (ck / "backend.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match="does not match"):
        other.load_state(ck)
    with pytest.raises(TrainingError):
        b.load_state(tmp_path / "no-such-checkpoint")


# -- through the shared loop ------------------------------------------------------------------------------------


def test_the_loop_trains_with_mlx_and_a_cancelled_run_resumes_to_the_same_adapter(tiny_workspace):
    from mipo_local import adapter_io
    from mipo_local.progress import run_to_end
    from mipo_local.settings import TrainSettings
    from mipo_local.train import runs
    from mipo_local.train.loop import train
    from tests.trainhelp import insert_pairs, signal_pairs

    settings = TrainSettings(backend="mlx", precision="fp32", rank=4, alpha=8, grad_accum=2, max_len=96, epochs=2,
                             checkpoint_every=1, eval_every=100, lr=1e-3)  # fmt: skip
    insert_pairs(tiny_workspace, signal_pairs(10))
    job = train(tiny_workspace, settings, run_name="cut")
    for event in job:
        if getattr(event, "done", 0) >= 3:
            job.close()  # cancelled between two steps: a checkpoint at step 3 is kept
            break
    assert runs.get_run(tiny_workspace, "cut").status == "cancelled"
    resumed = run_to_end(train(tiny_workspace, settings, run_name="cut", resume=True))
    straight = run_to_end(train(tiny_workspace, settings, run_name="straight"))
    assert resumed.steps == straight.steps == 10
    sources = {r[0] for r in tiny_workspace.query("SELECT DISTINCT source FROM ref_logps")}
    # Training's reference is MLX's own; the llama.cpp ones are the export check's (base, and base at Q8_0).
    assert sources == {"mlx:fp32", "llama.cpp", "llama.cpp:q8_0"}
    got, want = (
        adapter_io.load_adapter(runs.final_dir(tiny_workspace, name) / adapter_io.ADAPTER_FILE).tensors
        for name in ("cut", "straight")
    )
    assert set(got) == set(want) and np.abs(want["blk.0.attn_q.weight"].b).max() > 0
    for name in want:
        np.testing.assert_allclose(got[name].a, want[name].a, atol=1e-6)
        np.testing.assert_allclose(got[name].b, want[name].b, atol=1e-6)
