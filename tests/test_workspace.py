import os
import sqlite3
import stat

import pytest

from mipo_local.errors import JobBusyError, UserInputError, WorkspaceError
from mipo_local.workspace import SCHEMA_VERSION, Workspace, resolve_workspace_dir


def test_create_is_private_and_versioned(ws_dir):
    ws = Workspace.open(ws_dir, create=True)
    assert stat.S_IMODE(os.stat(ws_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ws.db_path).st_mode) == 0o600
    for sub in ("models", "runs", "exports", "evals"):
        assert stat.S_IMODE(os.stat(ws_dir / sub).st_mode) == 0o700
    assert ws.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION


def test_open_missing_workspace_says_init(tmp_path):
    with pytest.raises(WorkspaceError, match="mipo-local init"):
        Workspace.open(tmp_path / "nothing")


def test_newer_schema_is_refused(ws_dir):
    Workspace.open(ws_dir, create=True).close()
    con = sqlite3.connect(ws_dir / "mipo.db")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.commit()
    con.close()
    with pytest.raises(WorkspaceError, match="newer mipo-local"):
        Workspace.open(ws_dir)


def test_an_older_schema_is_migrated_forward_keeping_its_rows(ws_dir):
    from mipo_local.workspace import MIGRATIONS, _split_sql

    ws_dir.mkdir(mode=0o700)
    con = sqlite3.connect(ws_dir / "mipo.db")  # a workspace written by the first release (schema 1)
    for statement in _split_sql(MIGRATIONS[0]):
        con.execute(statement)
    con.execute("INSERT INTO contexts(text, created_at, updated_at) VALUES ('I am Ana.', 0, 0)")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    ws = Workspace.open(ws_dir)
    assert ws.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION > 1
    assert [c.text for c in ws.contexts()] == ["I am Ana."]
    assert ws.query("SELECT COUNT(*) FROM pair_skips")[0][0] == 0  # a table added by a later migration


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MIPO_LOCAL_HOME", str(tmp_path / "env"))
    assert resolve_workspace_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert resolve_workspace_dir(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("MIPO_LOCAL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_workspace_dir(None) == tmp_path / "xdg" / "mipo-local" / "default"


def test_contexts_and_prompts_round_trip(ws_dir):
    ws = Workspace.open(ws_dir, create=True)
    c = ws.add_context("  I am Ana.\r\nI cook.  ")
    assert ws.contexts()[0].text == "I am Ana.\nI cook."
    ws.update_context(c.id, "I am Ana, a chef.")
    assert ws.contexts()[0].text == "I am Ana, a chef."
    added, dups = ws.add_prompts(["Q1?", "Q2?", "Q1?"])
    assert [p.text for p in added] == ["Q1?", "Q2?"] and dups == ["Q1?"]
    ws.remove_prompt(added[0].id)
    assert [p.text for p in ws.prompts()] == ["Q2?"]
    ws.remove_context(c.id)
    assert ws.contexts() == []


def test_empty_inputs_change_nothing(ws_dir):
    ws = Workspace.open(ws_dir, create=True)
    with pytest.raises(UserInputError, match="context is empty"):
        ws.add_context("   ")
    with pytest.raises(UserInputError, match="item 2"):
        ws.add_prompts(["fine?", "  "])
    assert ws.count("prompts") == 0 and ws.count("contexts") == 0
    with pytest.raises(UserInputError, match="no prompt with id 9"):
        ws.remove_prompt(9)


def test_second_job_of_a_kind_is_refused_and_stale_lock_taken_over(ws_dir):
    ws = Workspace.open(ws_dir, create=True)
    other = Workspace.open(ws_dir)
    # A lock held by a live process other than us: our parent (pytest's launcher or the shell).
    with other.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs(kind, pid, host, description, started_at) VALUES ('pairs', ?, ?, 'mipo-local pairs', 0)",
            (os.getppid(), os.uname().nodename),
        )
    with pytest.raises(JobBusyError, match=f"process {os.getppid()}"):
        with ws.job("pairs", "second"):
            pass
    assert ws.count("prompts") == 0  # reads keep working
    # A lock left by a dead process (kill -9) is taken over.
    with other.transaction() as conn:
        conn.execute("UPDATE jobs SET pid = 2147480000 WHERE kind = 'pairs'")
    with ws.job("pairs", "resumed"):
        assert ws.running_jobs()[0]["description"] == "resumed"
    assert ws.running_jobs() == []
