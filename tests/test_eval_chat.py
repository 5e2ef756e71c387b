"""Evaluation and chat on a real trained run of the tiny model, merged into a GGUF by hand.

(Export has its own tests; here the merge is done with gguf_io directly so evaluation is tested on a real
exported-style file without depending on the export command's options.)
"""

import json
import time

import gguf
import numpy as np
import pytest

from mipo_local import adapter_io, gguf_io, modelsource
from mipo_local.errors import ModelError, WorkspaceError
from mipo_local.evaluate import evaluate
from mipo_local.progress import run_to_end
from mipo_local.settings import EvalSettings, TrainSettings
from mipo_local.train import runs
from mipo_local.train.loop import train
from tests.clihelp import run_cli
from tests.trainhelp import insert_pairs, signal_pairs


def _merge(base, adapter_path, target):
    adapter = adapter_io.load_adapter(adapter_path)
    reader = gguf_io.open_reader(base)

    def tensors():
        for name, arr in gguf_io.iter_float_tensors(reader):
            t = adapter.tensors.get(name)
            yield name, (arr + t.scale * (t.b @ t.a) if t else arr).astype(np.float32)

    return gguf_io.write_gguf(target, reader, tensors(), file_type=gguf.LlamaFileType.ALL_F32)


@pytest.fixture
def trained(tiny_workspace):
    ws = tiny_workspace
    ws.add_context("I am Ana, a pirate fan. Greet me with Ahoy.")
    insert_pairs(ws, signal_pairs(20))
    settings = TrainSettings(
        precision="fp32", threads=1, rank=4, alpha=8, max_len=96, lr=1e-3, eval_fraction=0.2
    )
    run_to_end(train(ws, settings, run_name="t"))
    run = runs.get_run(ws, "t")
    out = _merge(
        modelsource.base_model(ws).file,
        runs.final_dir(ws, "t") / adapter_io.ADAPTER_FILE,
        ws.root / "exports" / "m.gguf",
    )
    with ws.transaction() as conn:
        conn.execute(
            "INSERT INTO exports(run_id, kind, quant, path, size, info, created_at) VALUES (?, 'merged', 'f32', ?, ?, '{}', ?)",
            (run.id, str(out), out.stat().st_size, time.time()),
        )
    return ws


def test_eval_report_is_stored_with_plot(trained):
    report = run_to_end(evaluate(trained, EvalSettings(n=4, max_tokens=8)))
    assert report.n_pairs == 4 and 0.0 <= report.pair_accuracy <= 1.0
    assert np.isfinite([report.mean_margin, report.base.pmi, report.personalized.pmi, report.drift]).all()
    # The trained policy prefers the held-out chosen answers more than the base does (a learnable signal).
    assert report.mean_margin > 0
    assert len(report.samples) == 4 and all(s["personalized"] is not None for s in report.samples)
    saved = json.loads(next((trained.root / "evals").glob("eval-*.json")).read_text())
    assert saved["pair_accuracy"] == report.pair_accuracy
    png = next((trained.root / "evals").glob("eval-*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trained.count("evals") == 1


def test_eval_bad_inputs(tiny_workspace, tmp_path, trained):
    not_gguf = tmp_path / "judge.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        run_to_end(evaluate(trained, EvalSettings(n=2, max_tokens=4), judge=not_gguf))
    with trained.transaction() as conn:
        conn.execute("DELETE FROM exports")
    with pytest.raises(WorkspaceError, match="no export"):
        run_to_end(evaluate(trained, EvalSettings(n=2)))


def test_eval_with_judge_counts_win_tie_loss(trained, tiny_gguf):
    report = run_to_end(evaluate(trained, EvalSettings(n=3, max_tokens=6), judge=tiny_gguf))
    assert sum(report.judge[k] for k in ("win", "tie", "loss")) == 3
    assert 1 <= report.base.judge <= 5 and 1 <= report.personalized.judge <= 5


def test_chat_streams_and_compares(trained, ws_dir):
    r = run_cli(
        "chat", "--model", "latest", "--max-tokens", "6", input="Hello?\n/compare\nWhat now?\n/quit\n"
    )
    assert r.exit_code == 0, r.output
    assert "Chatting with export #1" in r.stdout
    assert "EXPORT #1" in r.stdout and "| BASE" in r.stdout
    r = run_cli("chat", "--model", str(ws_dir / "nope.gguf"), input="/quit\n")
    assert r.exit_code != 0 and "does not exist" in r.stderr
