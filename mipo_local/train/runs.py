"""Training runs in the workspace: the `runs` table, the run log, and each run's directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError, WorkspaceError
from ..validation import check_name
from ..workspace import Workspace

FINAL_DIR = "final"


@dataclass
class Run:
    id: int
    name: str
    status: str
    backend: str | None
    settings: dict
    base_model: dict
    summary: dict | None
    created_at: float
    updated_at: float

    @property
    def round(self) -> int:
        """Its self-improvement round: 1 for a run on the base model's pairs."""
        return int(self.settings.get("round") or 1)

    def describe_round(self) -> str:
        """ "round 1", or "round 2 (pairs sampled by run 'run-1')"."""
        if self.round == 1:
            return "round 1"
        return f"round {self.round} (pairs sampled by run '{self.settings.get('from_run')}')"

    @classmethod
    def from_row(cls, r) -> Run:
        return cls(
            r["id"], r["name"], r["status"], r["backend"], json.loads(r["settings"]), json.loads(r["base_model"]),
            json.loads(r["summary"]) if r["summary"] else None, r["created_at"], r["updated_at"],
        )  # fmt: skip


def run_dir(ws: Workspace, name: str) -> Path:
    return ws.root / "runs" / name


def final_dir(ws: Workspace, name: str) -> Path:
    return run_dir(ws, name) / FINAL_DIR


def get_run(ws: Workspace, name: str) -> Run | None:
    rows = ws.query("SELECT * FROM runs WHERE name = ?", (name,))
    return Run.from_row(rows[0]) if rows else None


def require_run(ws: Workspace, name: str | None, *, finished: bool = False) -> Run:
    """The named run, or the latest (finished) one; a clear error when there is none."""
    if name is None:
        sql = (
            "SELECT * FROM runs"
            + (" WHERE status = 'finished'" if finished else "")
            + " ORDER BY updated_at DESC LIMIT 1"
        )
        rows = ws.query(sql)
        if not rows:
            raise WorkspaceError(
                "There is no finished training run yet." if finished else "There is no training run yet.",
                hint="Run `mipo-local train` first.",
            )
        return Run.from_row(rows[0])
    run = get_run(ws, name)
    if run is None:
        names = ", ".join(r["name"] for r in ws.query("SELECT name FROM runs ORDER BY id")) or "none"
        raise UserInputError(f"There is no run named '{name}' (runs: {names}).")
    if finished and run.status != "finished":
        raise WorkspaceError(
            f"The run '{name}' has no finished checkpoint (status: {run.status}).",
            hint=f"Finish it with `mipo-local train --run {name} --resume`.",
        )
    return run


def list_runs(ws: Workspace) -> list[Run]:
    return [Run.from_row(r) for r in ws.query("SELECT * FROM runs ORDER BY id")]


def new_run_name(ws: Workspace) -> str:
    n = ws.count("runs") + 1
    while get_run(ws, f"run-{n}"):
        n += 1
    return f"run-{n}"


def create_run(ws: Workspace, name: str, backend: str, settings: dict, base_model: dict) -> Run:
    check_name("--run", name)
    now = time.time()
    with ws.transaction() as conn:
        if conn.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
            raise UserInputError(
                f"A run named '{name}' already exists.",
                hint="Pass --resume to continue it, or choose another --run name.",
            )
        conn.execute(
            "INSERT INTO runs(name, status, backend, settings, base_model, created_at, updated_at) VALUES (?, 'created', ?, ?, ?, ?, ?)",
            (name, backend, json.dumps(settings), json.dumps(base_model), now, now),
        )
    return get_run(ws, name)


def delete_run(ws: Workspace, run_id: int) -> None:
    """Remove a run that never trained: its row, its log and its (empty) folder."""
    import shutil

    rows = ws.query("SELECT name FROM runs WHERE id = ?", (run_id,))
    with ws.transaction() as conn:
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
    if rows:
        shutil.rmtree(run_dir(ws, rows[0]["name"]), ignore_errors=True)


def set_status(ws: Workspace, run_id: int, status: str, summary: dict | None = None) -> None:
    with ws.transaction() as conn:
        if summary is None:
            conn.execute(
                "UPDATE runs SET status = ?, updated_at = ? WHERE id = ?", (status, time.time(), run_id)
            )
        else:
            conn.execute(
                "UPDATE runs SET status = ?, summary = ?, updated_at = ? WHERE id = ?",
                (status, json.dumps(summary), time.time(), run_id),
            )


def log(ws: Workspace, run_id: int, step: int, kind: str, data: dict) -> None:
    with ws.transaction() as conn:
        conn.execute(
            "INSERT INTO run_log(run_id, step, kind, data, created_at) VALUES (?, ?, ?, ?, ?)",
            (run_id, step, kind, json.dumps(data), time.time()),
        )


def read_log(ws: Workspace, run_id: int, kind: str | None = None) -> list[dict]:
    sql, params = "SELECT step, kind, data FROM run_log WHERE run_id = ?", (run_id,)
    if kind:
        sql, params = sql + " AND kind = ?", (run_id, kind)
    return [
        {"step": r["step"], "kind": r["kind"], **json.loads(r["data"])}
        for r in ws.query(sql + " ORDER BY rowid", params)
    ]


def truncate_log(ws: Workspace, run_id: int, after_step: int) -> None:
    """Drop log lines past a checkpoint: a resumed run logs those steps again."""
    with ws.transaction() as conn:
        conn.execute("DELETE FROM run_log WHERE run_id = ? AND step > ?", (run_id, after_step))
