"""A full disk, for real: small tmpfs mounts (where this process may mount them; CI runs as root).

Each case: one `Error: ...` line, a non-zero exit, and the workspace exactly as it was (checksum), because
every write is a transaction or a temp file renamed into place.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from mipo_local.workspace import Workspace
from tests import exporthelp
from tests.clihelp import run_cli
from tests.faulthelp import checksum


@pytest.fixture
def small_disk(tmp_path):
    """Mounts tmpfs file systems of a given size; unmounted afterwards."""
    mounted = []

    def mount(name: str, size: str):
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _one_line_error(result, *pieces):
    assert result.exit_code != 0, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for piece in pieces:
        assert piece in result.stderr, (piece, result.stderr)


def _fill(point):
    """Fill the file system to the last byte (what a full disk is)."""
    fd = os.open(point / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_full_disk_under_the_workspace_database_and_files(small_disk, tiny_gguf, tmp_path, monkeypatch):
    point = small_disk("ws", "2m")
    ws_dir = point / "ws"
    monkeypatch.setenv("MIPO_LOCAL_HOME", str(ws_dir))
    assert run_cli("init", "--model", str(tiny_gguf)).exit_code == 0
    assert run_cli("context", "add", "I am Ana, a vegan chef in Lisbon.").exit_code == 0
    assert run_cli("prompts", "add", "What should I cook?", "Any dessert idea?").exit_code == 0
    big = tmp_path / "many.jsonl"  # more prompts than the disk can hold: the import is all or nothing
    big.write_text("".join(json.dumps({"prompt": f"Question {i}? " + "x" * 400}) + "\n" for i in range(8000)))
    _fill(point)
    before = checksum(ws_dir)
    _one_line_error(run_cli("prompts", "import", str(big), "--limit", "8000"), "Free some disk space")
    _one_line_error(
        run_cli("context", "add", "I also like jazz and long walks. " * 30), "Free some disk space"
    )
    assert checksum(ws_dir) == before
    (point / "filler").unlink()  # space again: nothing was lost, and the same command now works
    ws = Workspace.open(ws_dir)
    assert ws.count("prompts") == 2 and ws.count("contexts") == 1
    ws.close()
    assert run_cli("context", "add", "I also like jazz.").exit_code == 0


def test_full_disk_under_an_output_file(small_disk, tiny_gguf, ws_dir, tmp_path):
    assert run_cli("init", "--model", str(tiny_gguf)).exit_code == 0
    ws = Workspace.open(ws_dir)
    exporthelp.insert_pairs(ws, 40)
    ws.close()
    point = small_disk("out", "64k")
    _fill(point)
    before = checksum(ws_dir)
    _one_line_error(
        run_cli("pairs", "export", str(point / "pairs.jsonl")), "pairs.jsonl", "Free some disk space"
    )
    assert sorted(p.name for p in point.iterdir()) == ["filler"]  # no partial or temp file left
    assert checksum(ws_dir) == before


def test_export_checks_free_space_before_writing(small_disk, tiny_gguf, ws_dir):
    assert run_cli("init", "--model", str(tiny_gguf)).exit_code == 0
    ws = Workspace.open(ws_dir)
    exporthelp.make_finished_run(ws, "run-1")
    ws.close()
    point = small_disk("exp", "1m")
    before = checksum(ws_dir)
    r = run_cli("export", "--adapter-only", "--no-verify", "--out", str(point / "adapter"))
    _one_line_error(r, "Not enough free disk space", "MB needed")
    assert list(point.iterdir()) == [] and checksum(ws_dir) == before
