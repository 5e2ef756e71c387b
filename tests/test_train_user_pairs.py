"""Training on the user's pairs: the per-pair weight on the DPO objective (real torch backend, real gradients),
their place in the run (never held out, repeated when few, counted in `runs show`), and that a kill -9 during
training leaves every one of them intact."""

import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest

from mipo_local import modelsource, user_pairs
from mipo_local.chat import chat_format
from mipo_local.train import runs
from mipo_local.train.backend import LoraConfig, LoraTensor, PairBatch
from mipo_local.train.dpo import dpo_objective
from mipo_local.train.loop import train, user_repeats
from mipo_local.train.torch_backend import TorchBackend
from mipo_local.workspace import Workspace
from tests.clihelp import run_cli
from tests.faulthelp import integrity
from tests.trainhelp import CLI, FAST, drive, insert_pairs, kill_9_training, signal_pairs


def test_weights_multiply_each_pairs_objective():
    loss, chosen_logp, tokens = np.array([0.7, 0.5]), np.array([-20.0, -6.0]), np.array([10.0, 3.0])
    plain = dpo_objective(loss, chosen_logp, tokens, 0.5)
    assert dpo_objective(loss, chosen_logp, tokens, 0.5, np.array([2.0, 1.0])) == pytest.approx(
        [2 * plain[0], plain[1]]
    )


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    b = TorchBackend(precision="fp32", threads=1)
    b.load(tiny_gguf, LoraConfig(rank=4, alpha=8), seed=0)
    # LoRA's B starts at zero, which leaves A without a gradient: start both away from it.
    b.set_lora_tensors({k: LoraTensor(t.a + 0.01, t.b + 0.01, t.scale) for k, t in b.lora_tensors().items()})
    return b


def _gradients(b, pairs, weights):
    ref = b.logprobs(pairs, adapter=False)
    weights = None if weights is None else np.array(weights, dtype=float)
    metrics = b.accumulate(PairBatch(pairs, *ref, weights), beta=0.1, loss_scale=1.0, sft_weight=1.0)
    grads = {k: np.concatenate([g.a.ravel(), g.b.ravel()]) for k, g in b.lora_gradients().items()}
    b.optimizer.zero_grad(set_to_none=True)
    return np.concatenate([grads[k] for k in sorted(grads)]), metrics


def test_a_user_pair_weighted_w_pulls_w_times_as_hard(backend, tiny_gguf):
    cf = chat_format(str(tiny_gguf))
    mine = cf.encode_pair("I am Ana.", "How do I make tea?", "Ahoy Ana! Boil water first.", "Boil water.")
    mipo = cf.encode_pair("I am Ana.", "Any soup idea?", "Ahoy! A lentil soup.", "A lentil soup, perhaps.")
    g1, m1 = _gradients(backend, [mine], [1.0])
    g2, m2 = _gradients(backend, [mine], [2.0])
    g_plain, _ = _gradients(backend, [mine], None)
    assert np.abs(g1).max() > 0
    np.testing.assert_allclose(g2, 2 * g1, rtol=1e-5, atol=1e-9)  # the W=2 term is twice the W=1 term
    np.testing.assert_array_equal(g_plain, g1)  # no weights: every pair weighs 1
    assert m2["loss"] == pytest.approx(m1["loss"])  # the reported DPO loss stays unweighted
    # In a batch with a MIPO pair (weight 1), the objective is the mean of 2 x mine and 1 x theirs.
    g_mipo, _ = _gradients(backend, [mipo], None)
    g_both, _ = _gradients(backend, [mine, mipo], [2.0, 1.0])
    np.testing.assert_allclose(g_both, (2 * g1 + g_mipo) / 2, rtol=1e-4, atol=1e-7)


def test_oversampling_brings_few_user_pairs_to_an_eighth():
    assert user_repeats(0, 100) == 1 and user_repeats(50, 100) == 1
    assert user_repeats(16, 200) == 2  # 32 of 232 pairs an epoch: 14%
    assert user_repeats(2, 200) == 8  # capped: 16 of 216
    assert user_repeats(1, 7) == 1  # 1 of 8 already


def _workspace(path, tiny_gguf, n=12):
    ws = Workspace.open(path, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    insert_pairs(ws, signal_pairs(n))
    return ws


def _make_user_pairs(ws):
    user_pairs.review_pair(ws, 1, "keep")
    user_pairs.review_pair(ws, 2, "swap")
    user_pairs.review_pair(ws, 3, "edit", "Ahoy, Ana! Rice wants a lid and patience.")
    user_pairs.add_user_pair(ws, origin="chat", context="I am Ana, a pirate fan. Greet me with Ahoy.",
                             prompt="Hello?", chosen="Ahoy, Ana!", rejected="Hello.", identity=["bad", "Hello."])  # fmt: skip


def _user_rows(ws):
    return [dict(r) for r in ws.query("SELECT * FROM pairs WHERE source = 'user' ORDER BY id")]


def test_a_run_trains_on_every_user_pair_and_says_so(ws_dir, tiny_gguf):
    ws = _workspace(ws_dir, tiny_gguf, n=20)
    _make_user_pairs(ws)
    settings = dataclasses.replace(FAST, eval_fraction=0.25)
    summary, _ = drive(train(ws, settings, run_name="mine"))
    assert summary.user_pairs == 4 and summary.user_repeats == 1  # 4 of 19 train pairs: over an eighth
    saved = json.loads((runs.run_dir(ws, "mine") / "split.json").read_text())
    assert set(saved["user"]) == {1, 2, 3, 21} and not set(saved["user"]) & set(saved["heldout"])
    assert summary.train_pairs + summary.heldout_pairs == 21
    shown = run_cli("runs", "show", "mine").stdout
    assert (summary.train_pairs, summary.heldout_pairs) == (17, 4)  # 13 of MIPO's + the 4 of the user
    assert "Trained on 17 pairs (4 held out); 4 of them yours (weight 2, each seen 1x an epoch)." in shown

    # --user-weight 0 leaves them out.
    summary0, _ = drive(train(ws, dataclasses.replace(settings, user_weight=0.0), run_name="none"))
    assert summary0.user_pairs == 0 and summary0.train_pairs + summary0.heldout_pairs == 17
    assert "none of them yours" in run_cli("runs", "show", "none").stdout
    r = run_cli("train", "--user-weight", "-1")
    assert r.exit_code == 2 and "--user-weight must be between 0 and 100, not -1.0." in r.stderr


def test_kill_9_during_training_leaves_every_user_pair_intact(ws_dir, tiny_gguf):
    ws = _workspace(ws_dir, tiny_gguf)
    _make_user_pairs(ws)
    before = _user_rows(ws)
    assert len(before) == 4
    env = {**os.environ, "MIPO_LOCAL_HOME": str(ws_dir)}
    kill_9_training(ws, env)
    assert runs.get_run(ws, "k").status == "running"  # killed mid-run, not finished
    assert integrity(ws_dir) == "ok" and _user_rows(Workspace.open(ws_dir)) == before
    r = subprocess.run([*CLI, "train", "--run", "k", "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _user_rows(Workspace.open(ws_dir)) == before
    assert runs.get_run(ws, "k").summary["user_pairs"] == 4
