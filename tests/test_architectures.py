"""Every architecture the torch backend trains, end to end on a tiny GGUF of its own: training killed with
kill -9 resumes to the adapter an uninterrupted run reaches, and the merged Q8_0 export passes its fidelity
check in llama.cpp. (The decoder's log-probs against llama.cpp: test_torch_decoder.py.)"""

import os
import subprocess

import numpy as np
import pytest

from mipo_local import adapter_io, modelsource
from mipo_local.export import ExportSettings, export
from mipo_local.train import runs
from mipo_local.workspace import Workspace
from tests.test_export import drain
from tests.tiny_gguf import TinyConfig, build_tiny_llama
from tests.trainhelp import CLI, KILL_ARGS, insert_pairs, kill_9_training, signal_pairs

CONFIGS = {
    "llama": TinyConfig(),
    "qwen2": TinyConfig(architecture="qwen2"),
    "qwen3": TinyConfig(architecture="qwen3"),
    "gemma3": TinyConfig(architecture="gemma3", context_length=256),  # windowed layers see 64 positions
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_kill_9_resumes_to_the_same_adapter_and_the_export_passes_fidelity(
    arch, default_source_gguf, tmp_path
):
    base = build_tiny_llama(default_source_gguf, tmp_path / f"{arch}.gguf", CONFIGS[arch])

    def workspace(name):
        ws = Workspace.open(tmp_path / name, create=True)
        modelsource.set_base_model(ws, str(base))
        ws.add_context("I am Ana, a pirate fan. Greet me with Ahoy.")
        insert_pairs(ws, signal_pairs(12))
        return ws, {**os.environ, "MIPO_LOCAL_HOME": str(tmp_path / name)}

    ws, env = workspace("killed")
    kill_9_training(ws, env)
    assert runs.get_run(ws, "k").status == "running" and not runs.final_dir(ws, "k").exists()
    r = subprocess.run([*CLI, "train", "--run", "k", "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Resuming run 'k' at step " in r.stderr and "Resuming run 'k' at step 0" not in r.stderr
    resumed = adapter_io.load_adapter(runs.final_dir(ws, "k") / adapter_io.ADAPTER_FILE).tensors

    straight_ws, straight_env = workspace("straight")
    assert subprocess.run([*CLI, *KILL_ARGS], env=straight_env, capture_output=True).returncode == 0
    straight = adapter_io.load_adapter(runs.final_dir(straight_ws, "k") / adapter_io.ADAPTER_FILE).tensors
    assert set(resumed) == set(straight) and np.abs(straight["blk.0.attn_q.weight"].b).max() > 0
    for name in straight:
        np.testing.assert_allclose(resumed[name].a, straight[name].a, atol=1e-6)
        np.testing.assert_allclose(resumed[name].b, straight[name].b, atol=1e-6)

    _, result = drain(export(ws, "k", ExportSettings(threads=2), tmp_path / "export"))
    fid = result.fidelity
    assert result.quant == "q8_0" and result.warnings == [] and fid["ok"] and fid["pairs"] >= 1, fid
    assert fid["mean_abs_logp_diff"] < 0.5, fid
    ws.close()
    straight_ws.close()
