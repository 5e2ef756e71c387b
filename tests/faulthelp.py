"""Helpers for the reliability tests: a content checksum of a workspace, and CLI subprocesses that are
killed with SIGKILL at chosen points of their progress output."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "mipo_local.cli.main"]


def checksum(root: Path) -> str:
    """Everything under `root`: file bytes (but SQLite's -wal/-shm, which checkpoints rewrite) and, for each
    database, its rows (not its bytes)."""
    digest = hashlib.sha256()
    root = Path(root)
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        digest.update(str(path.relative_to(root)).encode())
        if path.is_dir():
            digest.update(b"<dir>")
        elif path.suffix == ".db":
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            digest.update("\n".join(con.iterdump()).encode())
            con.close()
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def integrity(ws_root: Path) -> str:
    con = sqlite3.connect(Path(ws_root) / "mipo.db")
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def live_job_locks(ws_root: Path) -> list[tuple]:
    """Rows of the jobs table whose process is still alive (a dead holder's row does not block a rerun)."""
    con = sqlite3.connect(Path(ws_root) / "mipo.db")
    try:
        rows = con.execute("SELECT kind, pid FROM jobs").fetchall()
    finally:
        con.close()
    alive = []
    for kind, pid in rows:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append((kind, pid))
    return alive


def _ctrl_c_as_at_a_terminal() -> None:
    """In the child: SIGINT back to its default. A suite started in the background (`pytest &`, nohup)
    inherits SIGINT as ignored, and so would the CLI; the tests send it Ctrl-C as a user at a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class CliRun:
    """One CLI subprocess whose stderr lines are read as they come, with the time each arrived."""

    args: list[str]
    env: dict
    proc: subprocess.Popen = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float | None = None

    def start(self) -> CliRun:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*CLI, *self.args], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=_ctrl_c_as_at_a_terminal,
        )  # fmt: skip
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._seen.notify_all()
        with self._seen:
            self.ended = time.monotonic()
            self._seen.notify_all()

    def wait_for(self, marker: str, timeout: float = 300) -> float | None:
        """The time the first stderr line containing `marker` arrived (None if the process ended first)."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for t, line in self.lines:
                    if marker in line:
                        return t
                if self.ended is not None or time.monotonic() > deadline:
                    return None
                self._seen.wait(0.05)

    def kill_at(self, when: float, or_on: str | None = None) -> bool:
        """SIGKILL at monotonic time `when`, or as soon as a stderr line containing `or_on` arrives if that
        comes first; True when the process was still running then."""
        while time.monotonic() < when:
            if self.proc.poll() is not None or (or_on and any(or_on in line for _, line in list(self.lines))):
                break
            time.sleep(0.005)
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.finish()
        return alive

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self.proc.stderr.close()
        self.ended = self.ended or time.monotonic()
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)


def run_to_end(args: list[str], env: dict) -> CliRun:
    run = CliRun(args, env).start()
    code = run.finish()
    assert code == 0, f"{args} exited {code}:\n{run.stderr[-3000:]}"
    return run
