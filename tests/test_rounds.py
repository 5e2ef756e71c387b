"""Self-improvement rounds and loop-free positives, on the tiny model with real llama.cpp.

- round 2's pairs come from base + round 1's LoRA loaded by llama.cpp as an adapter, and their stored
  log-probs are those of the merged model (within a measured tolerance);
- a looping (or otherwise degenerate) candidate never becomes a positive;
- mipo-local's repetition penalty is llama.cpp's (and so Ollama's), on the same logits.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from textual.widgets import Static

from mipo_local import candidates, merge, rounds
from mipo_local.adapter_io import ADAPTER_FILE, load_adapter
from mipo_local.chat import ChatFormat
from mipo_local.degenerate import verdict
from mipo_local.engine import Engine, Penalties
from mipo_local.gguf_io import open_reader
from mipo_local.settings import PairSettings
from mipo_local.train import runs
from tests import exporthelp
from tests.clihelp import run_cli
from tests.test_tui_core import drive, settle

# Measured on the tiny F32 model: base + adapter in llama.cpp against the F16-merged file differ by
# at most ~3e-3 nats per token (the F16 rounding of the merged weights); 0.02 per token leaves room.
PER_TOKEN_TOLERANCE = 0.02


def _fill(ws, n=3):
    ws.add_context("I am Ana, a vegan chef in Lisbon.")
    ws.add_prompts([f"How do I cook dish number {i}?" for i in range(n)])


def test_round_two_samples_from_base_plus_adapter_and_scores_like_the_merged_model(
    tiny_workspace, tiny_gguf, tmp_path
):
    _fill(tiny_workspace)
    exporthelp.make_finished_run(tiny_workspace, "run-1", std=0.2)
    args = ["--per-prompt", "1", "--max-tokens", "12", "--temperature", "0.8", "--guidance", "0"]
    r = run_cli("pairs", "--from-run", "run-1", *args)
    assert r.exit_code == 0, r.output
    round2 = tiny_workspace.query("SELECT * FROM pairs WHERE sampler = 'run-1'")
    assert len(round2) == 3 and {p["round"] for p in round2} == {2}
    sampler = rounds.sampler_for(tiny_workspace, "run-1")
    assert sampler.adapter.is_file() and sampler.round == 2
    assert all(json.loads(p["settings"])["sampler_adapter_sha256"] == sampler.adapter_sha256 for p in round2)
    # The same plans from the base are other pairs: different keys, different answers.
    assert run_cli("pairs", *args).exit_code == 0
    base_keys = {
        p["pair_key"]
        for p in tiny_workspace.query(
            "SELECT pair_key FROM pairs WHERE sampler IS NULL AND strategy != 'test'"
        )
    }
    assert len(base_keys) == 3 and not base_keys & {p["pair_key"] for p in round2}

    merged = tmp_path / "merged.gguf"
    adapter = load_adapter(runs.final_dir(tiny_workspace, "run-1") / ADAPTER_FILE)
    for _ in merge.merge_steps(
        tiny_gguf, merged, adapter.tensors, metadata={}, reader=open_reader(tiny_gguf)
    ):
        pass
    cf = ChatFormat(tiny_gguf)
    with Engine(merged, n_seq=2, ctx_per_seq=256) as engine:
        for p in round2:
            scores = json.loads(p["scores"])
            n = scores["chosen_tokens"]
            turn = json.loads(p["settings"])["context_turn"]  # the prompt the answer was sampled under
            prompt = cf.prompt_ids(p["context"], p["prompt"], context_turn=turn)
            # what the sampler scored: the sampled tokens; retokenized text can differ, so score the same
            # number of tokens of the stored text only when it round-trips
            tokens = cf.tokenizer.encode_text(p["chosen"])
            if len(tokens) != n:
                continue
            merged_lp = engine.score(prompt, tokens)
            assert abs(merged_lp - scores["logp_chosen_c"]) / n < PER_TOKEN_TOLERANCE


def test_train_from_run_continues_its_lora_and_records_the_round(tiny_workspace):
    _fill(tiny_workspace, n=4)
    common = ["--max-len", "96", "--rank", "2", "--alpha", "4", "--eval-every", "100"]
    assert run_cli("pairs", "--per-prompt", "1", "--max-tokens", "8").exit_code == 0
    assert run_cli("train", "--run", "r1", *common).exit_code == 0
    r = run_cli("train", "--from-run", "r1", "--run", "r2")
    assert r.exit_code == 2 and "no pairs of round 2" in r.stderr and "pairs --from-run r1" in r.stderr
    assert run_cli("pairs", "--from-run", "r1", "--per-prompt", "1", "--max-tokens", "8").exit_code == 0
    r = run_cli("train", "--from-run", "r1", "--run", "r2", "--eval-every", "100")
    assert r.exit_code == 0, r.output
    r2 = runs.get_run(tiny_workspace, "r2")
    assert r2.settings["round"] == 2 and r2.settings["from_run"] == "r1" and r2.settings["rank"] == 2
    assert r2.summary["train_pairs"] + r2.summary["heldout_pairs"] == 4  # round 2's pairs only
    shown = run_cli("runs", "show", "r2").stdout
    assert "round 2 (pairs sampled by run 'r1')" in shown
    assert [line.split()[:3] for line in run_cli("runs", "list").stdout.splitlines()[-2:]] == [
        ["r1", "finished", "1"],
        ["r2", "finished", "2"],
    ]

    async def the_train_screen_names_the_round(app, pilot):
        await pilot.press("4")
        await settle(app, pilot)
        state = str(app.screen.query_one("#run-state", Static).render())
        assert "r2" in state and "round 2 (pairs sampled by run 'r1')" in state

    drive(tiny_workspace.root, the_train_screen_names_the_round)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_degenerate_candidate_never_becomes_a_positive(tiny_gguf, temperature):
    """Greedy decoding of a random model loops; sampling at 1.0 rarely does. Either way no chosen answer
    is degenerate, and a plan whose every positive stays degenerate is dropped, not kept."""
    cf = ChatFormat(tiny_gguf)
    items = []
    for i in range(6):
        q = f"How do I cook dish number {i}?"
        neg = cf.prompt_ids("I am Bo, a pilot.", q)
        items.append(candidates.Item(f"k{i}", cf.prompt_ids("I am Ana.", q), neg, neg, "I am Ana.", q))
    settings = PairSettings(candidates=3, max_tokens=40, temperature=temperature, guidance=0)
    with Engine(tiny_gguf, n_seq=16, ctx_per_seq=256) as engine:
        choices = candidates.choose(engine, items, settings)
    passed_over = sum(len(c.degenerate) for c in choices.values())
    for c in choices.values():
        if c.chosen is not None:
            assert verdict(c.chosen.text, context="I am Ana.", cut=c.chosen.finish_reason == "length") is None
        else:
            assert c.attempts == candidates.RESAMPLE_ATTEMPTS + 1 and len(c.degenerate) == 3 * c.attempts
    if temperature == 0.0:  # the random model's greedy answers loop: the filter had work to do
        assert passed_over > 0


def test_positives_sampled_again_follow_the_model_without_guidance(tiny_gguf):
    """Guidance rewards what only the context makes likely, the wish's own words included, so a positive
    sampled again after degenerate ones is sampled from p(y|c,x) itself, the last time at a chat's
    temperature. Without a repetition penalty the random model's greedy answers loop, so some plans are
    sampled again."""
    cf = ChatFormat(tiny_gguf)
    items, negs = [], set()
    for i in range(8):
        q = f"How do I cook dish number {i}?"
        neg = cf.prompt_ids("I am Bo, a pilot.", q)
        items.append(candidates.Item(f"k{i}", cf.prompt_ids("I am Ana.", q), neg, neg, "I am Ana.", q))
        negs.add(tuple(neg))
    settings = PairSettings(candidates=2, max_tokens=120, temperature=0.0, guidance=1.0, repeat_penalty=1.0)
    positives_by_attempt = []

    class Recording:  # the real engine, with the requests of each sampling written down
        def __init__(self, engine):
            self.engine = engine

        def generate_steps(self, requests):
            positives_by_attempt.append([r for r in requests if r.id[1] == "pos"])
            return self.engine.generate_steps(requests)

        def score_many_steps(self, pairs):
            return self.engine.score_many_steps(pairs)

    with Engine(tiny_gguf, n_seq=32, ctx_per_seq=256) as engine:
        choices = candidates.choose(Recording(engine), items, settings)
    assert max(c.attempts for c in choices.values()) == len(positives_by_attempt)
    first, *again = positives_by_attempt
    assert again, "no positive was degenerate: nothing was sampled again"
    assert all(tuple(r.guide_prompt) in negs and r.guidance == 1.0 and r.temperature == 0.0 for r in first)
    assert all(r.guide_prompt is None and r.guidance == 0 for attempt in again for r in attempt)
    assert {r.temperature for r in again[0]} == (
        {0.0} if len(again) > 1 else {candidates.RESAMPLE_TEMPERATURE}
    )
    assert {r.temperature for r in again[-1]} == {candidates.RESAMPLE_TEMPERATURE}


def test_the_verdicts():
    assert verdict("") == "empty" and verdict("...  !") == "empty"
    assert verdict("Ahoy! " * 20) == "loop"
    assert verdict("Cook the rice. " * 8) == "loop"
    words = " ".join(f"step{i}" for i in range(60))
    tail = f"First {words}. " + "Stir it well. " * 8
    assert verdict(tail, cut=True) == "cut in a loop"
    assert (
        verdict(
            "I am very busy. Answer in at most 25 words.",
            context="I am very busy. Answer in at most 25 words.",
        )
        == "echoes the context"
    )
    signoff = "I am Tom. Always end your answer with the words 'Cheers, Tom!'."
    assert verdict("Tom, Cheers, Tom!", context=signoff) == "echoes the context"  # the wish, no answer
    assert verdict("Rice: rinse, boil, rest. Cheers, Tom!", context=signoff) is None
    assert verdict("Boil water, add rice, cover and wait twelve minutes.", context="I am very busy.") is None
    assert verdict("Bonjour Claire ! Pour le riz, faites bouillir de l'eau salée.") is None


def test_the_repetition_penalty_is_llama_cpps(tiny_gguf):
    """The same logits and history through mipo-local's Penalties and llama.cpp's penalties sampler."""
    import llama_cpp

    rng = np.random.default_rng(0)
    n_vocab = 300
    logits = rng.normal(0, 3, n_vocab).astype(np.float32)
    history = [int(t) for t in rng.integers(0, 40, 90)]
    for p in (
        Penalties(repeat=1.3, last_n=64),
        Penalties(repeat=1.1, last_n=16, presence=0.4, frequency=0.2),
    ):
        ours = p.apply(logits, history)
        sampler = llama_cpp.llama_sampler_init_penalties(n_vocab, p.last_n, p.repeat, p.frequency, p.presence)
        for tok in history:
            llama_cpp.llama_sampler_accept(sampler, tok)
        data = (llama_cpp.llama_token_data * n_vocab)(
            *[llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)]
        )
        arr = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
        theirs = np.array([data[i].logit for i in range(n_vocab)], np.float32)
        llama_cpp.llama_sampler_free(sampler)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
