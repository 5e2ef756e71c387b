import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mipo_local import adapter_io
from mipo_local.errors import TrainingError, UserInputError
from mipo_local.progress import run_to_end
from mipo_local.settings import TrainSettings
from mipo_local.train import runs
from mipo_local.train.loop import train
from tests.clihelp import run_cli
from tests.trainhelp import insert_pairs, signal_pairs

FAST = TrainSettings(
    precision="fp32",
    threads=1,
    rank=4,
    alpha=8,
    grad_accum=2,
    max_len=96,
    checkpoint_every=1,
    eval_every=2,
    lr=1e-3,
)


def test_run_writes_adapter_heldout_and_log(tiny_workspace):
    insert_pairs(tiny_workspace, signal_pairs(10))
    summary = run_to_end(train(tiny_workspace, FAST, run_name="a"))
    assert summary.train_pairs == 9 and summary.heldout_pairs == 1 and summary.steps == 5
    final = runs.final_dir(tiny_workspace, "a")
    adapter = adapter_io.load_adapter(final / adapter_io.ADAPTER_FILE)
    assert adapter.rank == 4 and adapter.alpha == 8 and "blk.0.attn_q.weight" in adapter.tensors
    assert len(adapter.tensors) == 2 * 7
    held = json.loads((final / "heldout.json").read_text())
    assert len(held) == 1 and {"policy_chosen", "ref_chosen"} <= set(held[0])
    log = runs.read_log(tiny_workspace, runs.get_run(tiny_workspace, "a").id)
    assert [x["step"] for x in log if x["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert {"loss", "margin", "accuracy", "reward_chosen", "lr", "tokens_per_s"} <= set(log[-2])
    assert runs.get_run(tiny_workspace, "a").status == "finished"
    # Reference log-probs are cached per pair: a second run computes none.
    assert tiny_workspace.query("SELECT COUNT(*) FROM ref_logps")[0][0] == 10


def test_bad_inputs(tiny_workspace):
    with pytest.raises(UserInputError, match="no pairs"):
        run_to_end(train(tiny_workspace, FAST))
    insert_pairs(tiny_workspace, signal_pairs(4))
    run_to_end(train(tiny_workspace, FAST, run_name="x"))
    with pytest.raises(UserInputError, match="already exists.*--resume"):
        run_to_end(train(tiny_workspace, FAST, run_name="x"))
    with pytest.raises(UserInputError, match="--targets has unknown names qq"):
        run_to_end(train(tiny_workspace, TrainSettings(targets=("qq",))))
    # A corrupt (infinite) reference makes the loss non-finite: training stops with a clear message.
    with tiny_workspace.transaction() as conn:
        conn.execute("UPDATE ref_logps SET chosen = ?", (float("inf"),))
    with pytest.raises(TrainingError, match="loss became inf"):
        run_to_end(train(tiny_workspace, FAST, run_name="nan"))
    assert runs.get_run(tiny_workspace, "nan").status == "failed"


def test_corrupt_checkpoint_falls_back_to_the_previous(tiny_workspace):
    from mipo_local import modelsource
    from mipo_local.train.backend import LoraConfig
    from mipo_local.train.checkpoints import checkpoint_dirs as _checkpoint_dirs
    from mipo_local.train.checkpoints import load_latest_checkpoint
    from mipo_local.train.torch_backend import TorchBackend

    insert_pairs(tiny_workspace, signal_pairs(10))
    gen = train(tiny_workspace, FAST, run_name="c")
    for ev in gen:
        if getattr(ev, "done", 0) >= 3:
            gen.close()
            break
    root = runs.run_dir(tiny_workspace, "c")
    cks = _checkpoint_dirs(root)
    assert [c.name for c in cks] == ["step-000002", "step-000003"]
    (cks[-1] / "backend.safetensors").write_bytes(b"garbage")
    b = TorchBackend(precision="fp32", threads=1)
    b.load(modelsource.base_model(tiny_workspace).file, LoraConfig(4, 8), seed=0)
    state, warnings = load_latest_checkpoint(root, b)
    assert state == {"step": 2} and "step-000003 is damaged" in warnings[0]
    assert runs.get_run(tiny_workspace, "c").status == "cancelled"


def test_kill_9_then_resume_equals_uninterrupted(ws_dir, tiny_gguf, tmp_path):
    from mipo_local import modelsource
    from mipo_local.workspace import Workspace

    def make(path):
        ws = Workspace.open(path, create=True)
        modelsource.set_base_model(ws, str(tiny_gguf))
        insert_pairs(ws, signal_pairs(40))
        return ws

    args = ["train", "--run", "k", "--precision", "fp32", "--threads", "1", "--rank", "4", "--alpha", "8", "--grad-accum", "1",
            "--max-len", "96", "--checkpoint-every", "1", "--eval-every", "100", "--lr", "1e-3", "--epochs", "3"]  # fmt: skip
    ws = make(ws_dir)
    env = {**os.environ, "MIPO_LOCAL_HOME": str(ws_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mipo_local.cli.main", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ck = runs.run_dir(ws, "k") / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(
        p.parent.name >= "step-000005" for p in ck.glob("step-*/state.json")
    ):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not runs.final_dir(ws, "k").exists()
    r = subprocess.run(
        [sys.executable, "-m", "mipo_local.cli.main", "train", "--run", "k", "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    resumed = adapter_io.load_adapter(runs.final_dir(ws, "k") / adapter_io.ADAPTER_FILE).tensors

    ref_ws = make(tmp_path / "ref")
    env_ref = {**os.environ, "MIPO_LOCAL_HOME": str(tmp_path / "ref")}
    assert (
        subprocess.run(
            [sys.executable, "-m", "mipo_local.cli.main", *args], env=env_ref, capture_output=True
        ).returncode
        == 0
    )
    straight = adapter_io.load_adapter(runs.final_dir(ref_ws, "k") / adapter_io.ADAPTER_FILE).tensors
    assert set(resumed) == set(straight)
    for name in straight:
        np.testing.assert_allclose(resumed[name].a, straight[name].a, atol=1e-6)
        np.testing.assert_allclose(resumed[name].b, straight[name].b, atol=1e-6)
    assert np.abs(straight["blk.0.attn_q.weight"].b).max() > 0  # it trained


@pytest.mark.slow
def test_default_model_short_run_beats_chance_on_heldout(ws_dir, default_f16_gguf):
    from mipo_local.workspace import Workspace

    assert run_cli("init").exit_code == 0
    ws = Workspace.open(ws_dir)
    insert_pairs(ws, signal_pairs(20))
    settings = TrainSettings(
        lr=5e-4, epochs=2, grad_accum=2, max_len=128, eval_fraction=0.2, eval_every=100, checkpoint_every=100
    )
    summary = run_to_end(train(ws, settings, run_name="slow"))
    assert summary.heldout_pairs == 4
    assert summary.final["accuracy"] > 0.5 and summary.final["margin"] > 0
