"""Two CLI processes on one workspace: while `pairs` runs (and commits pairs), a second `pairs` is refused
with a message naming the first job, reads and small writes keep working, and nobody sees SQLite's
"database is locked"."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from mipo_local import modelsource
from mipo_local.workspace import Workspace
from tests.faulthelp import CLI, CliRun, integrity


def test_second_pairs_job_is_refused_while_reads_keep_working(tiny_gguf, tmp_path):
    root = tmp_path / "ws"
    ws = Workspace.open(root, create=True)
    modelsource.set_base_model(ws, str(tiny_gguf))
    ws.add_context("I am Ana, a vegan chef in Lisbon.")
    # Far more pairs than the reads below take to run (~45 s on 2 cores), so the job is still going when it
    # gets its Ctrl-C; it is interrupted, so the size costs nothing.
    ws.add_prompts([f"What should I cook on day {i}?" for i in range(800)])
    env = {**os.environ, "MIPO_LOCAL_HOME": str(root)}

    def cli(*args):
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)

    first = CliRun(["pairs", "--max-tokens", "16", "--temperature", "0.8"], env).start()
    outputs = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and ws.count("pairs") < 1:  # it holds the lock and commits pairs
            assert first.proc.poll() is None, first.stderr[-2000:]
            time.sleep(0.05)
        assert ws.count("pairs") >= 1

        second = cli("pairs", "--max-tokens", "24")
        outputs.append(second.stdout + second.stderr)
        assert second.returncode != 0
        assert second.stderr.startswith("Error: Another pairs job is already running on this workspace")
        assert f"process {first.proc.pid}" in second.stderr and "mipo-local pairs" in second.stderr
        assert second.stderr.count("\n") == 1

        for _ in range(2):  # reads (and a small write) while the job keeps committing
            for args in (("status",), ("prompts", "list"), ("pairs", "list"), ("runs", "list")):
                r = cli(*args)
                outputs.append(r.stdout + r.stderr)
                assert r.returncode == 0, (args, r.stderr)
            status = outputs[-4]
            assert f"Running job: pairs (process {first.proc.pid})" in status
        r = cli("context", "add", "I also like short answers.")
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, r.stderr
        assert first.proc.poll() is None  # the long job was running the whole time
    finally:
        if first.proc.poll() is None:
            os.kill(first.proc.pid, signal.SIGINT)  # Ctrl-C: it saves what it finished and releases the lock
        code = first.finish()
    outputs.append(first.stderr)
    assert code == 130, first.stderr[-2000:]
    assert not any("database is locked" in out.lower() for out in outputs)
    assert integrity(root) == "ok"
    assert ws.running_jobs() == [] and ws.query("SELECT * FROM jobs") == []
    r = cli("status")
    assert r.returncode == 0 and "Running job" not in r.stdout
