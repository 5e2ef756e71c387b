"""The training loop on the tiny model: outputs, run log, resume (cancel, kill -9, damaged checkpoints),
bad input, NaN, out of memory, the reference cache; one slow run on the default model."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mipo_local import adapter_io, modelsource
from mipo_local.chat import EncodedPair
from mipo_local.errors import TrainingError, UserInputError
from mipo_local.pairs_store import Pair
from mipo_local.progress import Log, Progress
from mipo_local.settings import TrainSettings
from mipo_local.train import runs
from mipo_local.train.batching import (
    encode_pairs,
    epoch_order,
    pack_pairs,
    pack_sequences,
    split_heldout,
)
from mipo_local.train.checkpoints import checkpoint_dirs
from mipo_local.train.loop import resumed_settings, train
from mipo_local.workspace import Workspace
from tests.clihelp import run_cli
from tests.trainhelp import CLI, FAST, KILL_ARGS, drive, insert_pairs, kill_9_training, signal_pairs


def test_split_order_and_packing_are_pure_functions():
    ids = list(range(1, 41))
    train_ids, held = split_heldout(ids, 0.1, seed=3)
    assert len(held) == 4 and sorted(train_ids + held) == ids
    assert split_heldout(list(reversed(ids)), 0.1, seed=3) == (train_ids, held)
    assert split_heldout(ids, 0.1, seed=4)[1] != held
    # Adding pairs keeps most of the old held-out set (ranks do not depend on the other pairs).
    assert len(set(split_heldout(list(range(1, 45)), 0.1, seed=3)[1]) & set(held)) >= 3
    assert split_heldout([1, 2, 3], 0.1, 0) == ([1, 2, 3], [])
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 2)

    p = pack_pairs([EncodedPair([1, 2], [3, 4], [5]), EncodedPair([6], [7], [8, 9])])
    w = p.tokens.shape[1]
    assert w == 5  # one row per pair, padded to the longest row and no further
    assert p.tokens.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert p.positions[:, :5].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]  # rejected restarts after prompt
    assert p.predictors.tolist() == [1, 2, 1, w, w, w + 2] and p.targets.tolist() == [3, 4, 5, 7, 8, 9]
    assert p.owner.tolist() == [0, 0, 1, 2, 3, 3]
    assert p.mask[0, 4, :5].tolist() == [
        True,
        True,
        False,
        False,
        True,
    ]  # the rejected answer skips the chosen
    assert p.mask[1, 4].tolist() == [False] * 4 + [True] + [False] * (w - 5)  # padding sees only itself


def test_packing_sequences_one_causal_row_each():
    p = pack_sequences([([1, 2], [3, 4]), ([5], [6])])
    w = p.tokens.shape[1]
    assert w == 4 and p.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert p.positions[1, :2].tolist() == [0, 1] and p.n_sequences == 2
    assert (
        p.predictors.tolist() == [1, 2, w]
        and p.targets.tolist() == [3, 4, 6]
        and p.owner.tolist() == [0, 0, 1]
    )
    assert p.mask[0, 2, :4].tolist() == [True, True, True, False] and p.mask[1, 3, :4].tolist() == [
        False
    ] * 3 + [True]
    with pytest.raises(ValueError):
        pack_sequences([([1], [])])


def _pair(**kw) -> Pair:
    fields = {"id": 1, "pair_key": "k", "prompt": "Hi?", "context": "I am Ana.", "neg_context": "I like boats.",
              "neg_prompt": None, "strategy": "random-context", "chosen": "Hello Ana, well", "rejected": "Fine",
              "seed": 0, "settings": {}, "scores": None, "pmi_margin": None, "source": "generated"}  # fmt: skip
    return Pair(**{**fields, **kw})


def test_rejected_anchor_is_the_negative_where_it_came_from_another_context(tiny_gguf):
    from mipo_local.chat import chat_format

    cf = chat_format(str(tiny_gguf))

    def encoded(pair, max_len=512):
        return encode_pairs(str(tiny_gguf), [pair], max_len, "rejected")[0].encoded

    random_context = encoded(_pair())
    assert random_context.anchor_prompt == cf.prompt_ids("I like boats.", "Hi?")
    assert random_context.anchor_response == cf.response_ids("I like boats.", "Hi?", "Fine")
    no_context = encoded(_pair(neg_context=None, strategy="no-context"))
    assert no_context.anchor_prompt == cf.prompt_ids(None, "Hi?")
    # A random-prompt negative was sampled under the user's own context: nothing to anchor elsewhere.
    assert encoded(_pair(neg_context=None, neg_prompt="Bye?", strategy="random-prompt")).anchor_prompt is None
    # Cut to --max-len like the pair's own answers.
    short = encoded(_pair(rejected="word " * 200), 64)
    assert len(short.anchor_prompt) + len(short.anchor_response) == 64


def test_no_context_anchor_is_the_chosen_answer_without_a_system_turn(tiny_gguf):
    from mipo_local.chat import chat_format

    cf = chat_format(str(tiny_gguf))

    def encoded(pair, max_len=512):
        return encode_pairs(str(tiny_gguf), [pair], max_len, "no-context")[0].encoded

    for pair in (_pair(), _pair(neg_context=None, neg_prompt="Bye?", strategy="random-prompt")):
        e = encoded(pair)
        assert e.anchor_prompt == cf.prompt_ids(None, "Hi?") != e.prompt
        assert e.anchor_response == cf.response_ids(None, "Hi?", "Hello Ana, well")
    # A pair without a context of its own is already answered with none: nothing to anchor.
    assert encoded(_pair(context=None, neg_context="I like boats.")).anchor_prompt is None
    short = encoded(_pair(chosen="word " * 200), 64)
    assert len(short.anchor_prompt) + len(short.anchor_response) == 64
    # No anchor asked (the KL weight is 0): no sequence.
    assert encode_pairs(str(tiny_gguf), [_pair()], 512)[0].encoded.anchor_prompt is None


def test_run_writes_adapter_heldout_and_log(tiny_workspace):
    insert_pairs(tiny_workspace, signal_pairs(10))
    summary, events = drive(train(tiny_workspace, FAST, run_name="a"))
    assert summary.train_pairs == 9 and summary.heldout_pairs == 1 and summary.steps == 5
    assert any(isinstance(e, Progress) and e.unit == "pairs" for e in events)  # reference log-probs
    final = runs.final_dir(tiny_workspace, "a")
    adapter = adapter_io.load_adapter(final / adapter_io.ADAPTER_FILE)
    assert adapter.rank == 4 and adapter.alpha == 8 and len(adapter.tensors) == 2 * 7
    assert (
        adapter.architecture == "llama"
        and adapter.base_sha256 == modelsource.base_model(tiny_workspace).sha256
    )
    held = json.loads((final / "heldout.json").read_text())
    assert len(held) == 1 and {
        "pair_id",
        "policy_chosen",
        "policy_rejected",
        "ref_chosen",
        "ref_rejected",
    } <= set(held[0])
    run = runs.get_run(tiny_workspace, "a")
    assert run.status == "finished" and run.backend == "torch"
    log = runs.read_log(tiny_workspace, run.id)
    steps = [x for x in log if x["kind"] == "train"]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5]
    assert {
        "loss",
        "margin",
        "accuracy",
        "reward_chosen",
        "reward_rejected",
        "lr",
        "tokens_per_s",
        "eta_s",
    } <= set(steps[-1])
    assert [x["step"] for x in log if x["kind"] == "eval"] == [2, 4, 5]
    # Reference log-probs are cached per pair: a second run computes none.
    assert tiny_workspace.query("SELECT COUNT(*) FROM ref_logps WHERE source = 'torch:fp32'")[0][0] == 10
    _, events = drive(train(tiny_workspace, FAST, run_name="b"))
    assert not any(isinstance(e, Progress) and e.unit == "pairs" for e in events)

    out = run_cli("runs", "list")
    assert out.exit_code == 0 and "a " in out.stdout and "finished" in out.stdout
    out = run_cli("runs", "show", "a")
    assert out.exit_code == 0 and "step    5" in out.stdout
    out = run_cli("train", "--run", "a")
    assert out.exit_code == 2 and "Error: A run named 'a' already exists" in out.stderr


def test_bad_inputs(tiny_workspace):
    with pytest.raises(UserInputError, match="no pairs"):
        drive(train(tiny_workspace, FAST))
    insert_pairs(tiny_workspace, signal_pairs(4))
    with pytest.raises(UserInputError, match="--targets has unknown names qq"):
        drive(train(tiny_workspace, TrainSettings(targets=("qq",))))
    with pytest.raises(UserInputError, match="--lr must be between 0 and 1"):
        drive(train(tiny_workspace, TrainSettings(lr=2.0)))
    with pytest.raises(UserInputError, match="--kl-anchor must be no-context or rejected, not 'both'"):
        drive(train(tiny_workspace, TrainSettings(kl_anchor="both")))
    with pytest.raises(UserInputError, match="There is no run named 'nope'"):
        drive(train(tiny_workspace, FAST, run_name="nope", resume=True))
    drive(train(tiny_workspace, FAST, run_name="x"))
    with pytest.raises(UserInputError, match="already exists.*--resume"):
        drive(train(tiny_workspace, FAST, run_name="x"))
    with pytest.raises(UserInputError, match="already finished"):
        drive(train(tiny_workspace, FAST, run_name="x", resume=True))


def test_cancel_damaged_checkpoint_nan_and_resume(tiny_workspace):
    insert_pairs(tiny_workspace, signal_pairs(12))
    settings = TrainSettings(**{**FAST.__dict__, "checkpoint_every": 100, "eval_fraction": 0.0})
    # Ctrl-C between steps keeps the finished steps: a checkpoint is written on the way out.
    drive(train(tiny_workspace, settings, run_name="c"), stop_after_step=2)
    root = runs.run_dir(tiny_workspace, "c")
    assert [c.name for c in checkpoint_dirs(root)] == ["step-000002"]
    assert runs.get_run(tiny_workspace, "c").status == "cancelled"
    drive(train(tiny_workspace, settings, run_name="c", resume=True), stop_after_step=4)
    assert [c.name for c in checkpoint_dirs(root)] == ["step-000002", "step-000004"]

    # A damaged latest checkpoint: a warning, and the previous one is used.
    (root / "checkpoints" / "step-000004" / "backend.safetensors").write_bytes(b"garbage")
    summary, events = drive(train(tiny_workspace, settings, run_name="c", resume=True), stop_after_step=3)
    warnings = [e.message for e in events if isinstance(e, Log) and e.level == "warning"]
    assert "step-000004 is damaged" in warnings[0]
    assert any(isinstance(e, Log) and "at step 2 of 6" in e.message for e in events)

    # A non-finite loss stops training with a clear message; the last good checkpoint stays usable.
    with tiny_workspace.transaction() as conn:
        conn.execute("UPDATE ref_logps SET chosen = ?", (float("inf"),))
    with pytest.raises(TrainingError, match=r"loss became inf at step 4.*checkpoint \(step 3\) is kept"):
        drive(train(tiny_workspace, settings, run_name="c", resume=True))
    assert runs.get_run(tiny_workspace, "c").status == "failed"
    assert checkpoint_dirs(root)[-1].name == "step-000003"

    # Every checkpoint damaged: a clear error instead of silently starting over.
    for ck in checkpoint_dirs(root):
        (ck / "backend.json").write_text("{")
    with pytest.raises(TrainingError, match="No checkpoint .* can be read"):
        drive(train(tiny_workspace, settings, run_name="c", resume=True))


def test_other_context_kl_is_logged_and_a_run_from_before_it_resumes_without_it(tiny_workspace):
    insert_pairs(tiny_workspace, signal_pairs(12))  # no negative context: anchored under no context
    settings = TrainSettings(**{**FAST.__dict__, "checkpoint_every": 100, "eval_fraction": 0.0})
    drive(train(tiny_workspace, settings, run_name="k"), stop_after_step=2)
    logged = runs.read_log(tiny_workspace, runs.get_run(tiny_workspace, "k").id, "train")
    assert len(logged) == 2 and all(x["other_kl"] >= 0 for x in logged) and logged[1]["other_kl"] > 0
    # A run stored before the setting existed trained without the anchor, and resumes so.
    with tiny_workspace.transaction() as conn:
        stored = json.loads(conn.execute("SELECT settings FROM runs WHERE name = 'k'").fetchone()[0])
        del stored["other_context_kl"]
        conn.execute("UPDATE runs SET settings = ? WHERE name = 'k'", (json.dumps(stored),))
    drive(train(tiny_workspace, settings, run_name="k", resume=True), stop_after_step=3)
    logged = runs.read_log(tiny_workspace, runs.get_run(tiny_workspace, "k").id, "train")
    assert len(logged) == 3 and "other_kl" not in logged[2]


def test_a_resumed_run_keeps_the_anchor_it_started_with():
    stored = {**dataclasses.asdict(TrainSettings()), "targets": ["q", "v"]}
    assert resumed_settings(stored) == TrainSettings(targets=("q", "v"))
    # Stored before --kl-anchor existed: it trained on the rejected answers.
    del stored["kl_anchor"]
    assert resumed_settings(stored).kl_anchor == "rejected"
    del stored["other_context_kl"]  # before the anchor existed at all: none
    assert resumed_settings(stored).other_context_kl == 0.0


def test_reference_from_llama_cpp_logs_its_distance_to_the_exact_one(tiny_workspace):
    insert_pairs(tiny_workspace, signal_pairs(6))
    settings = TrainSettings(**{**FAST.__dict__, "ref": "llama.cpp", "eval_fraction": 0.0, "grad_accum": 6})
    summary, events = drive(train(tiny_workspace, settings, run_name="l"))
    assert summary.steps == 1
    info = [
        x
        for x in runs.read_log(tiny_workspace, runs.get_run(tiny_workspace, "l").id)
        if "ref_mean_abs_diff" in x
    ]
    assert info and info[0]["ref_compared_pairs"] == 6 and info[0]["ref_source"] == "llama.cpp"
    assert info[0]["ref_mean_abs_diff"] < 1e-3  # fp32 torch vs llama.cpp on an F32 model
    sources = {r[0] for r in tiny_workspace.query("SELECT DISTINCT source FROM ref_logps")}
    assert sources == {"llama.cpp", "torch:fp32"}
    out = run_cli("runs", "show", "l")
    assert "reference log-probs: llama.cpp vs torch:fp32 differ by 0.000" in out.stdout


OOM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch  # mapped before the cap, so only the training's own memory counts
    from mipo_local.errors import TrainingError
    from mipo_local.progress import Log
    from mipo_local.settings import TrainSettings
    from mipo_local.train.loop import train
    from mipo_local.workspace import Workspace

    def vm_bytes():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmSize"))
        return int(line.split()[1]) * 1024

    ws = Workspace.open(sys.argv[1])
    job = train(ws, TrainSettings(precision="fp32", threads=1, rank=4, alpha=8, max_len=8192))
    try:
        for event in job:
            if isinstance(event, Log) and "loading" in event.message:
                cap = vm_bytes() + (1 << 29)  # 512 MiB more than now: plenty for the tiny model, not for the batch
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except TrainingError as err:
        print("ERROR:", err)
    """
)


def test_out_of_memory_says_what_to_lower(tiny_workspace, ws_dir):
    long = " ".join(["word"] * 2500)
    insert_pairs(tiny_workspace, [(f"Question {i}?", long, long + " again") for i in range(4)])
    env = {**os.environ, "MIPO_LOCAL_HOME": str(ws_dir)}
    out = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT, str(ws_dir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert "ERROR: Out of memory" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "Lower --max-len, --batch-size or --rank" in out.stdout
    assert "while loading" not in out.stdout, out.stdout  # the batch ran out, not the model load


def test_kill_9_then_resume_equals_uninterrupted(ws_dir, tiny_gguf, tmp_path):
    def make(path):
        ws = Workspace.open(path, create=True)
        modelsource.set_base_model(ws, str(tiny_gguf))
        insert_pairs(ws, signal_pairs(12))
        return ws

    ws = make(ws_dir)
    env = {**os.environ, "MIPO_LOCAL_HOME": str(ws_dir)}
    kill_9_training(ws, env)
    assert not runs.final_dir(ws, "k").exists()
    assert runs.get_run(ws, "k").status == "running"  # what a killed process leaves behind
    r = subprocess.run([*CLI, "train", "--run", "k", "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Resuming run 'k' at step " in r.stderr and "Resuming run 'k' at step 0" not in r.stderr
    resumed = adapter_io.load_adapter(runs.final_dir(ws, "k") / adapter_io.ADAPTER_FILE).tensors

    ref_ws = make(tmp_path / "ref")
    env_ref = {**os.environ, "MIPO_LOCAL_HOME": str(tmp_path / "ref")}
    assert subprocess.run([*CLI, *KILL_ARGS], env=env_ref, capture_output=True).returncode == 0
    straight = adapter_io.load_adapter(runs.final_dir(ref_ws, "k") / adapter_io.ADAPTER_FILE).tensors
    assert set(resumed) == set(straight)
    for name in straight:
        np.testing.assert_allclose(resumed[name].a, straight[name].a, atol=1e-6)
        np.testing.assert_allclose(resumed[name].b, straight[name].b, atol=1e-6)
    assert np.abs(straight["blk.0.attn_q.weight"].b).max() > 0  # it trained


@pytest.mark.slow
def test_default_model_short_run_beats_chance_on_heldout(ws_dir, default_f16_gguf):
    assert run_cli("init").exit_code == 0
    ws = Workspace.open(ws_dir)
    insert_pairs(ws, signal_pairs(20))
    settings = TrainSettings(lr=5e-4, epochs=2, grad_accum=2, max_len=128, eval_fraction=0.2, eval_every=100,
                             checkpoint_every=100)  # fmt: skip
    summary, _ = drive(train(ws, settings, run_name="slow"))
    assert summary.heldout_pairs == 4
    assert summary.final["accuracy"] > 0.5 and summary.final["margin"] > 0
