import numpy as np
import pytest

from mipo_local.chat import chat_format
from mipo_local.engine import Engine, GenRequest, log_softmax, sample_token
from mipo_local.llama_loader import load_llama


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    eng = Engine(tiny_gguf, n_seq=8, ctx_per_seq=256, n_threads=2)
    yield eng
    eng.close()


def _requests(tiny_gguf, n, temperature=0.8):
    cf = chat_format(str(tiny_gguf))
    return [
        GenRequest(
            cf.prompt_ids("I am Ana.", f"Question {i}?"), max_tokens=12, temperature=temperature, seed=i, id=i
        )
        for i in range(n)
    ]


def test_batched_generation_returns_every_request_and_is_seeded(engine, tiny_gguf):
    reqs = _requests(tiny_gguf, 12)  # more requests than slots: continuous batching refills slots
    first = {r.id: r.tokens for r in engine.generate(reqs)}
    assert sorted(first) == list(range(12))
    assert all(0 < len(t) <= 12 for t in first.values())
    # The same requests give the same answers (llama.cpp on CPU is deterministic for the same batches).
    assert {r.id: r.tokens for r in engine.generate(reqs)} == first
    assert len({tuple(t) for t in first.values()}) > 1  # different seeds/prompts give different answers


def test_generation_decodes_many_sequences_in_each_llama_decode_call(engine, tiny_gguf, monkeypatch):
    """Batched for real: one llama_decode per step carries a token of every active sequence."""
    calls = []
    decode = engine._lc.llama_decode

    def counting(ctx, batch):
        calls.append({batch.seq_id[i][0] for i in range(batch.n_tokens)})
        return decode(ctx, batch)

    monkeypatch.setattr(engine._lc, "llama_decode", counting)
    results = list(engine.generate(_requests(tiny_gguf, 8)))
    generated = sum(len(r.tokens) for r in results)
    assert max(map(len, calls)) == 8  # all 8 requests side by side in one batch
    assert len(calls) <= max(len(r.tokens) for r in results) + 1 < generated  # not one call per token


def test_score_equals_direct_llama_cpp_logprobs(engine, tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    prompt = cf.prompt_ids("I am Ana.", "Hi?")
    response = cf.response_ids("I am Ana.", "Hi?", "Hello Ana, nice to meet you!")
    llm = load_llama(tiny_gguf, n_ctx=256, logits_all=True)
    llm.eval(prompt + response)
    rows = np.array(llm.scores[len(prompt) - 1 : len(prompt) + len(response) - 1])
    direct = log_softmax(rows)[np.arange(len(response)), response].sum()
    many = engine.score_many([(prompt, response), (prompt, response[:3])])
    assert many[0] == pytest.approx(direct, abs=1e-3)
    assert many[1] == pytest.approx(log_softmax(rows[:3])[np.arange(3), response[:3]].sum(), abs=1e-3)


def test_sampling_follows_temperature_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.9, 0.0, -1.0], dtype=np.float32)
    assert sample_token(logits, 0.0, 0.9, rng) == 0  # temperature 0 is greedy
    assert {sample_token(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}  # the top token holds 52%
    assert {sample_token(logits, 1.0, 0.6, rng) for _ in range(200)} == {0, 1}
    draws = np.bincount([sample_token(logits, 1.0, 1.0, rng) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(draws, np.exp(log_softmax(logits)), atol=0.03)
    cold = np.bincount([sample_token(logits, 0.1, 1.0, rng) for _ in range(400)], minlength=4) / 400
    assert cold[0] > 0.65  # a low temperature sharpens the 52/47 split towards the top token


def test_stream_yields_text(engine, tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    pieces = list(engine.stream(cf.prompt_ids(None, "Hi"), max_tokens=8, seed=1))
    assert len(pieces) >= 1 and all(isinstance(p, str) for p in pieces)


def test_stream_chat_renders_the_template_and_matches_stream(engine, tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    messages = [{"role": "system", "content": "I am Ana."}, {"role": "user", "content": "Hi?"}]
    via_chat = "".join(engine.stream_chat(messages, max_tokens=10, temperature=0.8, seed=3))
    via_ids = "".join(
        engine.stream(cf.prompt_ids("I am Ana.", "Hi?"), max_tokens=10, temperature=0.8, seed=3)
    )
    assert via_chat == via_ids and via_chat


def test_too_long_prompt_is_a_clear_error(engine):
    from mipo_local.errors import UserInputError

    with pytest.raises(UserInputError, match="300 tokens does not fit the 256-token context"):
        list(engine.generate([GenRequest([1] * 300, max_tokens=4)]))
    with pytest.raises(UserInputError, match="conversation is 300 tokens long"):
        list(engine.stream([1] * 300))
    with pytest.raises(UserInputError, match="exceed the 256-token context"):
        engine.score([1] * 200, [2] * 100)


def test_shared_prompts_are_read_once_and_score_as_if_alone(engine, tiny_gguf):
    """A pair's chosen and rejected (and K candidates) share their prompt in one decode: same numbers."""
    cf = chat_format(str(tiny_gguf))
    items = []
    for who, question in (("I am Ana.", "Hi?"), ("I am Bo, a pilot.", "What should I pack for a long trip?")):
        prompt = cf.prompt_ids(who, question)
        for answer in ("Hello there!", "Pack light and bring a good book.", "No."):
            items.append((prompt, cf.response_ids(who, question, answer)))
    together = engine.token_logprobs(items)
    with Engine(tiny_gguf, n_seq=1, ctx_per_seq=256, n_threads=2) as alone_engine:
        alone = [alone_engine.token_logprobs([item])[0] for item in items]
    for a, b, (_, response) in zip(together, alone, items, strict=True):
        assert a.shape == (len(response),)
        np.testing.assert_allclose(a, b, atol=1e-3)  # measured: up to 1.5e-4, float noise of the batch shape
    assert engine.token_logprobs([(items[0][0], [])])[0].shape == (0,)


def test_guided_logits_are_the_pointwise_mi_tilt_over_plausible_tokens():
    from mipo_local.engine import GUIDE_PLAUSIBLE_LOG, guided_logits

    rng = np.random.default_rng(0)
    main, guide = rng.normal(0, 3, 50).astype(np.float32), rng.normal(0, 3, 50).astype(np.float32)
    out = guided_logits(main, guide, 1.5)
    lp_m, lp_g = log_softmax(main[None])[0], log_softmax(guide[None])[0]
    plausible = lp_m >= lp_m.max() + GUIDE_PLAUSIBLE_LOG
    assert np.allclose(out[plausible], 2.5 * lp_m[plausible] - 1.5 * lp_g[plausible], atol=1e-4)
    assert np.isneginf(out[~plausible]).all() and (~plausible).any()


def test_guidance_against_the_same_prompt_is_plain_greedy_decoding(engine, tiny_gguf):
    """The guide sequence runs in lockstep: contrasted with itself, the tilt cancels and greedy stays greedy."""
    plain = _requests(tiny_gguf, 5, temperature=0.0)
    guided = [GenRequest(**{**r.__dict__, "guide_prompt": r.prompt, "guidance": 2.0}) for r in plain]
    assert {r.id: r.tokens for r in engine.generate(guided)} == {
        r.id: r.tokens for r in engine.generate(plain)
    }


def test_guidance_raises_the_answers_pointwise_mi(engine, tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    questions = [f"What should I cook on day {i}?" for i in range(8)]
    user, other = "I am Ana, a vegan chef in Lisbon.", "I am Bo, a retired pilot in Oslo who loves jazz."

    def mean_pmi(guidance):
        reqs = [
            GenRequest(
                cf.prompt_ids(user, q),
                max_tokens=12,
                temperature=0.8,
                seed=i,
                id=i,
                guide_prompt=cf.prompt_ids(other, q),
                guidance=guidance,
            )
            for i, q in enumerate(questions)
        ]
        out = {r.id: r.tokens for r in engine.generate(reqs)}
        with_c = engine.score_many([(cf.prompt_ids(user, q), out[i]) for i, q in enumerate(questions)])
        with_o = engine.score_many([(cf.prompt_ids(other, q), out[i]) for i, q in enumerate(questions)])
        return float(np.mean(np.array(with_c) - np.array(with_o)))

    # The tiny random model barely reacts to its system turn (plain PMI ~0.00); guidance still moves it.
    assert mean_pmi(3.0) > mean_pmi(0.0) + 0.1


def test_candidates_of_one_prompt_read_it_once(tiny_gguf, monkeypatch):
    """Four candidates of one prompt (and of one guided prompt pair): the prompts' tokens go through
    llama_decode once, each candidate keeps its own seeded answer, and a second call gives the same."""
    cf = chat_format(str(tiny_gguf))
    prompt, guide = cf.prompt_ids("I am Ana.", "Hi?"), cf.prompt_ids("I am Bo.", "Hi?")
    reqs = [GenRequest(prompt, max_tokens=10, temperature=0.9, seed=j, id=("plain", j)) for j in range(4)]
    reqs += [GenRequest(prompt, max_tokens=10, temperature=0.9, seed=j, id=("guided", j), guide_prompt=guide,
                        guidance=1.0) for j in range(4)]  # fmt: skip
    read = []
    with Engine(tiny_gguf, n_seq=12, ctx_per_seq=128, n_threads=2) as engine:
        decode = engine._lc.llama_decode

        def counting(ctx, batch):
            read.append(batch.n_tokens)
            return decode(ctx, batch)

        monkeypatch.setattr(engine._lc, "llama_decode", counting)
        first = {r.id: r.tokens for r in engine.generate(reqs)}
        # the first decode reads the plain group's prompt once (4 candidates, 1 read) and the guided group's
        # prompt and guide once; every later decode carries one token per running sequence
        assert read[0] == 2 * len(prompt) + len(guide)
        assert all(n <= 12 for n in read[1:])
        assert len({tuple(first[("plain", j)]) for j in range(4)}) > 1
        assert {r.id: r.tokens for r in engine.generate(reqs)} == first
