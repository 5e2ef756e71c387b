"""Hostile places and files, for real: a workspace that is a file, a read-only workspace, a full disk
under the F16 merge and the quantizer, an export killed inside the user's own folder, imports that a
careless converter wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from mipo_local import gguf_io, merge, quantize
from mipo_local.errors import UserInputError, WorkspaceError
from mipo_local.prompts_import import parse_prompts
from tests import exporthelp
from tests.clihelp import run_cli
from tests.faulthelp import CliRun, checksum
from tests.test_disk_full import _fill, small_disk  # noqa: F401  (the fixture)


def _one_line(r, piece: str) -> None:
    assert r.exit_code not in (0, None), r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output and piece in r.stderr, r.stderr


def test_a_workspace_that_is_a_file_or_lies_under_one(tmp_path, monkeypatch):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for place, piece in ((afile, "MIPO_LOCAL_HOME"), (afile / "ws", "which is a file")):
        monkeypatch.setenv("MIPO_LOCAL_HOME", str(place))
        for args in (("init",), ("status",), ("context", "list"), ("pairs",)):
            _one_line(run_cli(*args), piece)
    assert afile.read_text() == "mine"


def _read_only(path):
    """Make `path` read-only for this process: immutable when running as root (root ignores modes)."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")
        return lambda: subprocess.run(["chattr", "-R", "-i", str(path)], check=True)
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    return lambda: [p.chmod(p.stat().st_mode | 0o200) for p in [path, *path.rglob("*")]]


def test_a_read_only_workspace_shows_everything_and_refuses_changes(tiny_workspace, ws_dir):
    tiny_workspace.add_context("I am Ana, a vegan chef.")
    tiny_workspace.add_prompts(["How do I cook rice?"])
    exporthelp.insert_pairs(tiny_workspace, 2)
    tiny_workspace.close()
    before = checksum(ws_dir)
    undo = _read_only(ws_dir)
    try:
        for args in (
            ("status",),
            ("context", "list"),
            ("prompts", "list"),
            ("pairs", "list"),
            ("runs", "list"),
        ):
            r = run_cli(*args)
            assert r.exit_code == 0, (args, r.output)
        assert "vegan chef" in run_cli("context", "list").stdout
        for args in (("context", "add", "I like jazz."), ("prompts", "add", "Why?"), ("pairs", "rm", "1")):
            _one_line(run_cli(*args), "read-only")
        _one_line(run_cli("init"), "read-only")
    finally:
        undo()
    assert checksum(ws_dir) == before


def test_opening_a_workspace_writes_nothing(tiny_workspace, ws_dir):
    tiny_workspace.add_context("I am Ana.")
    tiny_workspace.close()
    db = ws_dir / "mipo.db"
    stamp = (db.stat().st_mtime_ns, db.read_bytes())
    for args in (("status",), ("context", "list"), ("prompts", "list")):
        assert run_cli(*args).exit_code == 0
    assert (db.stat().st_mtime_ns, db.read_bytes()) == stamp


def test_a_full_disk_under_the_f16_merge_and_the_quantizer(small_disk, tiny_gguf, tmp_path):  # noqa: F811
    point = small_disk("full", "4m")
    _fill(point)
    reader = gguf_io.open_reader(tiny_gguf)
    lora = exporthelp.random_lora(tiny_gguf, reader=reader)
    with pytest.raises(WorkspaceError, match="The disk is full"):
        for _ in merge.merge_steps(tiny_gguf, point / "merged.gguf", lora, metadata={}, reader=reader):
            pass
    f16 = tmp_path / "f16.gguf"
    for _ in merge.merge_steps(tiny_gguf, f16, lora, metadata={}, reader=reader):
        pass
    with pytest.raises(WorkspaceError, match="The disk is full"):
        quantize.quantize(f16, point / "q8.gguf", "q8_0")
    assert sorted(p.name for p in point.iterdir()) == ["filler"]


def test_an_export_killed_in_the_users_folder_is_cleaned_at_the_next_job(tiny_workspace, ws_dir, tmp_path):
    tiny_workspace.add_context("I am Ana.")
    tiny_workspace.add_prompts(["How do I cook rice?"])
    exporthelp.make_finished_run(tiny_workspace, "run-1")
    tiny_workspace.close()
    folder = tmp_path / "my-models"
    folder.mkdir()
    env = {**os.environ, "MIPO_LOCAL_HOME": str(ws_dir)}
    run = CliRun(["export", "--quant", "f16", "--out", str(folder / "model")], env).start()
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".model.") for p in folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.kill_at(time.monotonic()), "the export finished before it could be killed"
    assert any(p.name.startswith(".model.") for p in folder.iterdir())  # what kill -9 leaves
    assert run_cli("prompts", "synth", "--n", "1").exit_code == 0  # any job
    assert list(folder.iterdir()) == []


def test_chatgpt_exports_written_by_other_tools(tmp_path):
    f = tmp_path / "conversations.json"
    conv = {
        "mapping": {
            "a": {"message": {"author": "user", "content": {"parts": "A bare string?"}, "create_time": "3"}},
            "b": {"message": {"author": {"role": "user"}, "content": "Plain content?", "create_time": None}},
            "c": {
                "message": {"author": {"role": "user"}, "content": {"parts": ["Listed?"]}, "create_time": 1.5}
            },
            "d": {"message": ["not", "a", "message"]},
            "e": {"message": {"author": 7, "content": {"parts": ["skipped"]}}},
        }
    }
    f.write_text(json.dumps([conv]))
    prompts, fmt = parse_prompts(f)
    assert fmt == "chatgpt"
    assert sorted(prompts) == ["A bare string?", "Listed?", "Plain content?"]  # one prompt each, not letters


def test_utf16_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("How do I cook rice?\nWhat is tea?\n".encode("utf-16"))
    assert parse_prompts(f) == (["How do I cook rice?", "What is tea?"], "text")


def test_bulk_removal_of_prompts(tiny_workspace, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("".join(f"Imported question {i}?\n" for i in range(30)))
    assert run_cli("prompts", "add", "Mine?").exit_code == 0
    assert run_cli("prompts", "import", str(f)).exit_code == 0
    assert tiny_workspace.count("prompts") == 31
    r = run_cli("prompts", "rm", "2-5", "7")
    assert r.exit_code == 0 and "Removed 5 prompts." in r.stdout
    r = run_cli("prompts", "rm", "--source", "import")
    assert r.exit_code == 0 and "Removed 25 prompts." in r.stdout
    assert [p.text for p in tiny_workspace.prompts()] == ["Mine?"]
    with pytest.raises(UserInputError, match="no prompt with id 99"):
        tiny_workspace.remove_prompts([1, 99])
    assert tiny_workspace.count("prompts") == 1  # all or nothing


def test_a_failed_start_leaves_no_run_behind(tiny_workspace, tiny_gguf, tmp_path):
    """A run that fails before its first step (here: the base model file is damaged) leaves no
    'cancelled' row, so the same --run name works once the problem is fixed."""
    from mipo_local import modelsource

    copy = tmp_path / "base.gguf"
    shutil.copy(tiny_gguf, copy)
    modelsource.set_base_model(tiny_workspace, str(copy))
    exporthelp.insert_pairs(tiny_workspace, 4)
    copy.write_bytes(copy.read_bytes()[:2000])
    r = run_cli("train", "--run", "first", "--max-len", "64")
    _one_line(r, "base.gguf")
    assert tiny_workspace.query("SELECT name FROM runs") == []
    shutil.copy(tiny_gguf, copy)
    assert run_cli("train", "--run", "first", "--max-len", "64").exit_code == 0
