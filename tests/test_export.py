"""Export: merged F16 metadata, quantized export end to end, adapter export, exports list, bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest

from mipo_local import fidelity, fsutil, gguf_io, merge, modelsource
from mipo_local.engine import Engine, GenRequest
from mipo_local.errors import ExportError, UserInputError
from mipo_local.export import export, list_exports
from mipo_local.progress import Progress
from mipo_local.quantize import resolve_quant
from mipo_local.settings import ExportSettings
from mipo_local.train import runs
from mipo_local.workspace import Workspace
from tests.clihelp import run_cli
from tests.exporthelp import CONTEXT, make_finished_run, random_lora
from tests.test_responsive import decodes  # noqa: F401 (a fixture)


def drain(job):
    """Run a job generator to the end; returns (events, result)."""
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as stop:
            return events, stop.value


@pytest.fixture(scope="module")
def export_ws(tmp_path_factory, tiny_gguf):
    """A workspace on the tiny model with a finished run ('run-1', random LoRA, 6 held-out pairs)."""
    ws = Workspace.open(tmp_path_factory.mktemp("export") / "ws", create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context(CONTEXT)
    run = make_finished_run(ws, "run-1")
    yield ws, run
    ws.close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _n_exports(ws) -> int:
    return ws.count("exports")


# -- merge -------------------------------------------------------------------------------------------------


def test_merged_f16_keeps_every_metadata_key_and_adds_provenance(tiny_gguf, tmp_path):
    base = gguf_io.open_reader(tiny_gguf)
    lora = random_lora(tiny_gguf, reader=base)
    meta = merge.provenance(base_sha256="f" * 64, run_name="run-7", run_settings={"rank": 4, "lr": 5e-5})
    path = merge.merge_to_f16(tiny_gguf, tmp_path / "m.gguf", lora, metadata=meta, reader=base)
    out = gguf.GGUFReader(path)  # read back with gguf-py's own reader

    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.FILE_TYPE:
            continue
        assert key in out.fields, key
        assert out.fields[key].types == field.types, key
        assert out.fields[key].contents() == field.contents(), key
    assert out.get_field(gguf.Keys.General.FILE_TYPE).contents() == gguf.LlamaFileType.MOSTLY_F16
    assert out.get_field("mipo_local.version").contents()
    assert out.get_field("mipo_local.base_sha256").contents() == "f" * 64
    assert out.get_field("mipo_local.run").contents() == "run-7"
    assert json.loads(out.get_field("mipo_local.settings").contents()) == {"lr": 5e-5, "rank": 4}

    base_tensors = {t.name: t for t in base.tensors}
    assert [t.name for t in out.tensors] == list(base_tensors)
    for t in out.tensors:
        want = gguf_io.tensor_to_float32(base_tensors[t.name])
        if t.name in lora:
            want = want + lora[t.name].scale * lora[t.name].b @ lora[t.name].a
        expected_type = gguf.GGMLQuantizationType.F32 if want.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == expected_type, t.name
        np.testing.assert_allclose(gguf_io.tensor_to_float32(t), want, rtol=1e-3, atol=1e-5, err_msg=t.name)
    changed = gguf_io.tensor_to_float32(next(t for t in out.tensors if t.name in lora))
    assert not np.allclose(changed, gguf_io.tensor_to_float32(base_tensors[next(iter(lora))]), atol=1e-3)


# -- the export job ----------------------------------------------------------------------------------------


def test_quantized_export_end_to_end(export_ws, tmp_path):
    ws, run = export_ws
    before = _n_exports(ws)
    out = tmp_path / "q8"
    events, result = drain(export(ws, None, ExportSettings(quant="q8_0", threads=2), out))

    gguf_name = "tiny-llama-2x64-run-1-Q8_0.gguf"
    assert result.run == "run-1" and result.kind == "merged" and result.quant == "q8_0"
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf_name, "Modelfile"])  # no F16 left over
    assert _leftovers(tmp_path) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # A real Q8_0 GGUF, provenance kept through llama.cpp's quantizer.
    r = gguf_io.open_reader(out / gguf_name)
    assert gguf_io.field_value(r, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert gguf_io.field_value(r, "mipo_local.run") == "run-1"
    assert gguf_io.field_value(r, "mipo_local.base_sha256") == fsutil.sha256_file(run.base_model["path"])
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 2} == {"Q8_0"}
    # The Modelfile: the file, the translated template, the stop token, the user's context as SYSTEM.
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f'FROM ./{gguf_name}\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and f'SYSTEM """{CONTEXT}"""' in modelfile
    # The fidelity check ran on the held-out pairs, and everything is recorded.
    fid = result.fidelity
    assert fid["pairs"] == 6 and fid["sign_agreement"] >= 0.95 and fid["pearson"] > 0.99 and fid["ok"]
    assert any("Fidelity on 6 held-out pairs" in getattr(e, "message", "") for e in events)
    assert _n_exports(ws) == before + 1
    row = list_exports(ws)[-1]
    assert (row.id, row.run, row.kind, row.quant, row.path) == (
        result.id,
        "run-1",
        "merged",
        "q8_0",
        str(out / gguf_name),
    )
    assert row.size == sum(p.stat().st_size for p in out.iterdir())
    assert row.info["fidelity"] == fid and row.info["modelfile"] == str(out / "Modelfile")
    assert {"merge_f16_s", "quantize_s", "verify_s", "total_s"} <= set(row.info["timings"])
    assert ws.running_jobs() == []
    # The quantized file loads in llama.cpp and generates.
    from mipo_local.chat import chat_format

    prompt = chat_format(str(run.base_model["path"])).prompt_ids(CONTEXT, "Hello?")
    with Engine(out / gguf_name, n_seq=1, ctx_per_seq=256, n_threads=2) as engine:
        answer = next(engine.generate([GenRequest(prompt, max_tokens=8, temperature=0.0)]))
    assert len(answer.tokens) == 8


def test_adapter_export(export_ws, tmp_path):
    ws, run = export_ws
    out = tmp_path / "adapter"
    _, result = drain(export(ws, "run-1", ExportSettings(adapter_only=True, threads=2), out))
    name = "tiny-llama-2x64-run-1-lora.gguf"
    assert result.kind == "adapter" and result.quant is None and result.path == out / name
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "Modelfile"])
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM {run.base_model['path']}", f"ADAPTER ./{name}"]
    r = gguf_io.open_reader(out / name)
    assert gguf_io.field_value(r, gguf.Keys.General.TYPE) == "adapter"
    assert gguf_io.field_value(r, "mipo_local.run") == "run-1"
    # Base + adapter in llama.cpp is what the held-out "policy" log-probs were scored with: identical.
    assert result.fidelity["sign_agreement"] == 1.0 and result.fidelity["mean_abs_logp_diff"] < 1e-3


def test_fidelity_scores_at_most_verify_pairs(export_ws, tmp_path):
    ws, _ = export_ws
    settings = ExportSettings(adapter_only=True, verify_pairs=2, threads=2)
    events, result = drain(export(ws, "run-1", settings, tmp_path / "capped"))
    assert (result.fidelity["pairs"], result.fidelity["available"]) == (2, 6)
    assert any("Fidelity on 2 (of 6) held-out pairs" in getattr(e, "message", "") for e in events)


def test_fidelity_compares_margin_signs_and_logprobs():
    heldout = [
        {"pair_id": i, "policy_chosen": c, "policy_rejected": r, "ref_chosen": -10.0, "ref_rejected": -10.0}
        for i, (c, r) in enumerate([(-8.0, -12.0), (-9.0, -11.0), (-12.0, -9.0), (-10.5, -10.0)])
    ]
    # Export log-probs: pairs 0-2 keep their margin's sign, pair 3 flips (-0.5 -> +0.2).
    scored = [(-8.1, -12.2), (-9.0, -11.1), (-12.3, -9.1), (-10.1, -10.3)]
    fid = fidelity.compare(heldout, scored, threshold=0.95)
    assert fid.pairs == 4 and fid.sign_agreement == 0.75 and not fid.ok
    policy = [-8.0, -9.0, -12.0, -10.5, -12.0, -11.0, -9.0, -10.0]
    export_lp = [-8.1, -9.0, -12.3, -10.1, -12.2, -11.1, -9.1, -10.3]
    assert fid.pearson == pytest.approx(np.corrcoef(policy, export_lp)[0, 1])
    assert fid.mean_abs_logp_diff == pytest.approx(np.mean(np.abs(np.subtract(policy, export_lp))))


def test_fidelity_shortfall_is_a_clear_warning(export_ws, tmp_path):
    ws, _ = export_ws
    settings = ExportSettings(quant="q4_0", min_sign_agreement=1.01, threads=2)  # a bar no export can meet
    events, result = drain(export(ws, "run-1", settings, tmp_path / "short"))
    warnings = [e.message for e in events if getattr(e, "level", "") == "warning"]
    assert any("This export falls short" in w and "Prefer --quant q8_0" in w for w in warnings), warnings
    assert result.fidelity["ok"] is False and list_exports(ws)[-1].info["warnings"] == result.warnings


def test_f16_export_without_system_or_verify(export_ws, tmp_path):
    ws, _ = export_ws
    settings = ExportSettings(quant="f16", system_from_contexts=False, verify=False)
    _, result = drain(export(ws, "run-1", settings, tmp_path / "f16"))
    r = gguf_io.open_reader(result.path)
    assert gguf_io.field_value(r, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_F16
    assert "SYSTEM" not in result.modelfile.read_text()
    assert result.fidelity is None and list_exports(ws)[-1].info["fidelity"] is None


def test_cli_export_and_exports_list(export_ws, tmp_path):
    ws, _ = export_ws
    out = tmp_path / "cli-q4"
    res = run_cli(
        "-w", str(ws.root), "export", "--quant", "q4_0", "--no-verify", "--out", str(out), "--threads", "2"
    )
    assert res.exit_code == 0, res.output
    assert "Exported run 'run-1' as a Q4_0 model" in res.stdout and "Modelfile:" in res.stdout
    listed = run_cli("-w", str(ws.root), "exports", "list")
    assert listed.exit_code == 0, listed.output
    line = next(ln for ln in listed.stdout.splitlines() if str(out) in ln)
    assert "run-1" in line and "merged" in line and "Q4_0" in line and " MB" in line
    for e in list_exports(ws):  # every export is listed with its fidelity (or '-')
        assert str(e.id) in listed.stdout


def test_ollama_create_runs_the_ollama_cli(export_ws, tmp_path, monkeypatch):
    ws, _ = export_ws
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\necho "$PWD" >> "{calls}"\n')
    script.chmod(0o700)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "with-ollama"
    res = run_cli(
        "-w", str(ws.root), "export", "--adapter-only", "--no-verify", "--out", str(out), "--ollama", "ana"
    )
    assert res.exit_code == 0, res.output
    assert calls.read_text().splitlines() == [f"create ana -f {out / 'Modelfile'}", str(out)]
    assert "Created the Ollama model 'ana'" in res.output


def test_ollama_missing_prints_the_exact_command(export_ws, tmp_path, monkeypatch):
    ws, _ = export_ws
    monkeypatch.setenv(
        "PATH",
        os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "ollama").exists()),
    )
    out = tmp_path / "no-ollama"
    res = run_cli(
        "-w", str(ws.root), "export", "--adapter-only", "--no-verify", "--out", str(out), "--ollama", "ana"
    )
    assert res.exit_code == 0, res.output
    assert f"ollama create ana -f {out / 'Modelfile'}" in res.output


# -- bad input: one clear sentence, nothing left behind -----------------------------------------------------


def _check_refused(ws, parent: Path, args: list[str], code: int, *needles: str) -> str:
    before = (_n_exports(ws), sorted(p.name for p in parent.iterdir()) if parent.exists() else [])
    res = run_cli("-w", str(ws.root), "export", *args)
    assert res.exit_code == code, res.output
    assert res.stderr.startswith("Error: ") or code == 2, res.output
    for needle in needles:
        assert needle in res.output, res.output
    after = (_n_exports(ws), sorted(p.name for p in parent.iterdir()) if parent.exists() else [])
    assert after == before  # no row, no file, no temp folder
    assert ws.running_jobs() == []
    return res.output


def test_unknown_run_and_unsupported_quant(export_ws):
    ws, _ = export_ws
    exports_dir = ws.root / "exports"
    _check_refused(ws, exports_dir, ["--run", "nope"], 2, "There is no run named 'nope' (runs: run-1")
    out = _check_refused(ws, exports_dir, ["--quant", "q3_k"], 2, "q3_k")
    assert "auto" in out and "q4_k_m" in out  # the valid names are listed
    with pytest.raises(UserInputError, match="choose one of: auto, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0"):
        resolve_quant("q2_k", 135_000_000)
    assert resolve_quant("auto", 135_000_000) == "q8_0" and resolve_quant(None, 1_500_000_000) == "q4_k_m"


def test_run_without_finished_checkpoint(export_ws):
    ws, run = export_ws
    exports_dir = ws.root / "exports"
    unfinished = runs.create_run(ws, "half", "test", run.settings, run.base_model)
    runs.set_status(ws, unfinished.id, "running")
    _check_refused(ws, exports_dir, ["--run", "half"], 1, "The run 'half' has no finished checkpoint")
    # Marked finished, but its final adapter is gone.
    runs.set_status(ws, unfinished.id, "finished")
    _check_refused(ws, exports_dir, ["--run", "half"], 1, "lora.safetensors is missing")
    runs.set_status(ws, unfinished.id, "failed")


def test_no_finished_run_at_all(tiny_workspace):
    res = run_cli("export")
    assert res.exit_code == 1 and "There is no finished training run yet" in res.output


def test_existing_output_needs_force(export_ws, tmp_path):
    ws, _ = export_ws
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["--adapter-only", "--no-verify", "--out", str(out)]
    _check_refused(ws, tmp_path, args, 2, f"The output folder {out} already exists", "--force")
    assert (out / "mine.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("x")
    _check_refused(ws, tmp_path, ["--out", str(tmp_path / "a-file")], 2, "is a file")
    res = run_cli("-w", str(ws.root), "export", *args, "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "mine.txt").exists() and (out / "Modelfile").exists()
    assert _leftovers(tmp_path) == []


def test_not_enough_disk_space(export_ws, tmp_path, monkeypatch):
    ws, _ = export_ws
    real = fsutil.shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=3_000_000)

    monkeypatch.setattr(fsutil.shutil, "disk_usage", nearly_full)
    out = _check_refused(
        ws, tmp_path, ["--out", str(tmp_path / "q")], 1, "Not enough free disk space", "MB needed"
    )
    assert "3 MB free" in out


def test_changed_base_model_is_refused(export_ws, tmp_path):
    ws, run = export_ws
    from mipo_local.adapter_io import ADAPTER_FILE, load_adapter, save_adapter
    from mipo_local.fsutil import private_dir

    adapter = load_adapter(runs.final_dir(ws, "run-1") / ADAPTER_FILE)
    other = runs.create_run(ws, "other-base", "test", run.settings, run.base_model)
    save_adapter(private_dir(runs.final_dir(ws, "other-base")) / ADAPTER_FILE, adapter.tensors, alpha=adapter.alpha,
                 rank=adapter.rank, base_sha256="0" * 64, architecture="llama")  # fmt: skip
    runs.set_status(ws, other.id, "finished")
    with pytest.raises(ExportError, match="changed since run 'other-base' was trained"):
        drain(export(ws, "other-base", ExportSettings(verify=False), tmp_path / "x"))
    assert list(tmp_path.iterdir()) == [] and ws.running_jobs() == []
    runs.set_status(ws, other.id, "failed")


def test_cancelled_export_leaves_nothing(export_ws, tmp_path):
    ws, _ = export_ws
    before = _n_exports(ws)
    job = export(ws, "run-1", ExportSettings(quant="q8_0"), tmp_path / "cancel")
    while type(next(job)).__name__ != "Progress":  # stop in the middle of the merge
        pass
    job.close()
    assert list(tmp_path.iterdir()) == []
    assert _n_exports(ws) == before and ws.running_jobs() == []


def test_fidelity_check_reports_each_decode_step_and_stops_at_the_next(export_ws, tmp_path, decodes):  # noqa: F811
    ws, _ = export_ws
    settings = ExportSettings(quant="q8_0", threads=2)
    events = [e for e in export(ws, "run-1", settings, tmp_path / "steps") if isinstance(e, Progress)]
    checking = [e for e in events if e.phase == "fidelity check"]
    assert len(checking) >= 3 and checking[0].message == "the exported model"  # 12 answers, 4 a decode
    assert checking[-1].fraction == 1.0 and [e.unit for e in checking] == ["answers"] * len(checking)
    assert [e.fraction for e in checking] == sorted(e.fraction for e in checking)
    assert any(e.phase == "loading model" and e.message == "the exported model" for e in events)

    before = _n_exports(ws)
    job = export(ws, "run-1", ExportSettings(quant="q8_0", threads=2), tmp_path / "stop")
    for event in job:
        if isinstance(event, Progress) and event.phase == "fidelity check":
            at_close = decodes["calls"]
            job.close()  # after the first decode step of the check
            break
    assert decodes["calls"] == at_close  # not one decode step after the close
    assert not (tmp_path / "stop").exists() and _n_exports(ws) == before and ws.running_jobs() == []


# -- the real default model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_q8_0_export(ws_dir, default_f16_gguf, tmp_path):
    ws = Workspace.open(ws_dir, create=True)
    modelsource.set_base_model(ws, str(default_f16_gguf))
    ws.add_context(CONTEXT)
    # A rank-8 LoRA on all targets whose held-out margins are a few nats, like a trained run's.
    make_finished_run(ws, "run-1", n_pairs=8, rank=8, alpha=16.0, std=0.05)
    _, result = drain(export(ws, None, ExportSettings(threads=2), tmp_path / "out"))
    assert result.quant == "q8_0"  # auto: Q8_0 under 1B parameters
    assert 100e6 < result.files[result.path.name] < 200e6  # 135M parameters at 8.5 bits
    fid = result.fidelity
    assert fid["sign_agreement"] >= 0.95 and fid["pearson"] > 0.99, fid
    ws.close()


def test_unrecorded_default_folder_is_replaced_a_recorded_one_is_refused(export_ws):
    """A kill between the final rename and the database record leaves a folder nothing refers to."""
    ws, _ = export_ws
    settings = ExportSettings(adapter_only=True, verify=False)
    _, first = drain(export(ws, "run-1", settings))
    with ws.transaction() as conn:  # what the kill leaves: the folder, no row
        conn.execute("DELETE FROM exports WHERE id = ?", (first.id,))
    events, again = drain(export(ws, "run-1", settings))
    assert any(getattr(e, "message", "").startswith(f"Replaced {first.directory}") for e in events)
    assert again.directory == first.directory and again.path.is_file()
    with pytest.raises(UserInputError, match="already exists"):
        drain(export(ws, "run-1", settings))
