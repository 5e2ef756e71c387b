"""The workspace: one private directory holding a SQLite database and the model files.

Layout of a workspace directory (0700, files 0600):

    mipo.db            contexts, prompts, pairs, runs, run log, exports, evaluations, jobs, config
    models/            prepared base models (the default model's F16 working copy)
    runs/NAME/         training checkpoints (safetensors + JSON state)
    exports/ID/        exported GGUF files, adapters, Modelfiles
    evals/             evaluation reports (JSON, PNG)

Every write is one SQLite transaction; the schema is versioned by `PRAGMA user_version` and migrated
forward on open.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JobBusyError, UserInputError, WorkspaceError
from .fsutil import PRIVATE_FILE, pid_alive, private_dir, remove_stale_temps
from .validation import (
    CONTEXT_CHARS_MAX,
    CONTEXT_TOKENS_MAX,
    PROMPT_CHARS_MAX,
    PROMPT_TOKENS_MAX,
    check_label,
    check_text,
)

DB_NAME = "mipo.db"

# Each entry migrates from version i to i+1. Append only; never edit a released step.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE contexts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        label TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL DEFAULT 'user',   -- user | import | synthetic
        created_at REAL NOT NULL
    );
    CREATE TABLE pairs (
        id INTEGER PRIMARY KEY,
        pair_key TEXT NOT NULL UNIQUE,          -- identifies the request, so resume never regenerates
        prompt_id INTEGER REFERENCES prompts(id) ON DELETE SET NULL,
        context_id INTEGER REFERENCES contexts(id) ON DELETE SET NULL,
        prompt TEXT NOT NULL,
        context TEXT NOT NULL,
        neg_context TEXT,                        -- c' (random-context), NULL for no-context
        neg_prompt TEXT,                         -- x' (random-prompt)
        strategy TEXT NOT NULL,
        chosen TEXT NOT NULL,
        rejected TEXT NOT NULL,
        seed INTEGER NOT NULL,
        settings TEXT NOT NULL,                  -- JSON: sampling settings and model sha
        scores TEXT,                             -- JSON: log-probs and PMI, NULL when not scored
        pmi_margin REAL,                         -- PMI(chosen) - PMI(rejected), for filtering and sorting
        source TEXT NOT NULL DEFAULT 'generated', -- generated | import
        created_at REAL NOT NULL
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,                    -- created | running | finished | failed | cancelled
        backend TEXT,
        settings TEXT NOT NULL,
        base_model TEXT NOT NULL,
        summary TEXT,                            -- JSON: final metrics
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE run_log (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        kind TEXT NOT NULL,                      -- train | eval | info
        data TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX run_log_run ON run_log(run_id, step);
    CREATE TABLE exports (
        id INTEGER PRIMARY KEY,
        run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        kind TEXT NOT NULL,                      -- merged | adapter
        quant TEXT,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        info TEXT NOT NULL,                      -- JSON: files, modelfile, fidelity, timings
        created_at REAL NOT NULL
    );
    CREATE TABLE evals (
        id INTEGER PRIMARY KEY,
        export_id INTEGER REFERENCES exports(id) ON DELETE SET NULL,
        run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
        report TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        kind TEXT PRIMARY KEY,                   -- pairs | train | export | eval | run | synth
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        description TEXT NOT NULL,
        started_at REAL NOT NULL
    );
    """,
    # 2: pairs that were generated but dropped (PMI filter), so a rerun does not sample them again;
    #    reference log-probs cached per pair and model.
    """
    CREATE TABLE pair_skips (
        pair_key TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE ref_logps (
        pair_id INTEGER NOT NULL REFERENCES pairs(id) ON DELETE CASCADE,
        model_sha256 TEXT NOT NULL,
        source TEXT NOT NULL,                    -- torch | mlx | llama.cpp
        max_len INTEGER NOT NULL,
        chosen REAL NOT NULL,
        rejected REAL NOT NULL,
        PRIMARY KEY (pair_id, model_sha256, source, max_len)
    );
    """,
    # 3: a pair dropped by the PMI filter keeps the threshold that dropped it and its text, so a rerun with a
    #    lower threshold (or none) restores it instead of calling it done.
    """
    ALTER TABLE pair_skips ADD COLUMN min_pmi REAL;
    ALTER TABLE pair_skips ADD COLUMN pair_row TEXT;
    """,
    # 4: provenance of every pair. `round`: the self-improvement round it belongs to; `sampler`: the run
    #    whose model (base + that run's LoRA) sampled it, NULL for the base model; `origin`: for pairs the
    #    user made (source = 'user'), where: review | chat | ab.
    """
    ALTER TABLE pairs ADD COLUMN round INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE pairs ADD COLUMN sampler TEXT;
    ALTER TABLE pairs ADD COLUMN origin TEXT;
    CREATE INDEX pairs_sampler ON pairs(sampler);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


_ABOUT_YOU = "write a few words about yourself"


def default_workspace_dir() -> Path:
    """The workspace used when neither --workspace nor MIPO_LOCAL_HOME is given."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "mipo-local" / "default"


def resolve_workspace_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The one place that decides where the workspace lives: --workspace > MIPO_LOCAL_HOME > XDG.

    Raises:
        WorkspaceError: the place is a regular file, or lies under one.
    """
    if explicit:
        path, where = Path(explicit).expanduser().resolve(), "--workspace"
    elif os.environ.get("MIPO_LOCAL_HOME"):
        path, where = Path(os.environ["MIPO_LOCAL_HOME"]).expanduser().resolve(), "MIPO_LOCAL_HOME"
    else:
        path, where = default_workspace_dir(), "The default workspace"
    for probe in (path, *path.parents):
        if probe.exists():
            if not probe.is_dir():
                what = "is a file" if probe == path else f"lies under {probe}, which is a file"
                raise WorkspaceError(
                    f"{where} {path} {what}, not a folder.",
                    hint="Point --workspace (or MIPO_LOCAL_HOME) at a folder.",
                )
            break
    return path


@dataclass
class Context:
    id: int
    text: str
    label: str | None
    created_at: float


@dataclass
class Prompt:
    id: int
    text: str
    source: str
    created_at: float


def _now() -> float:
    return time.time()


def normalize_text(text: str) -> str:
    """Strip outer white space and turn CRLF into LF; inner text is the user's and stays as written."""
    return text.replace("\r\n", "\n").strip()


class Workspace:
    """A workspace directory and its database. Safe to use from several threads and processes."""

    def __init__(self, root: Path, *, read_only: bool = False):
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        # A workspace on a read-only file system (or an immutable folder) opens for reading only: listing
        # and showing work, and anything that would write says why it cannot.
        self.read_only = read_only
        self._local = threading.local()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike | None = None, *, create: bool = False) -> Workspace:
        """Open (or with create=True, create) the workspace at `root` (resolved as documented)."""
        path = resolve_workspace_dir(root)
        # Everything written while a workspace is open (checkpoints, exports, Modelfiles with the user's
        # contexts) is created owner-only, whichever library or tool writes it.
        os.umask(0o077)
        if not (path / DB_NAME).exists():
            if not create:
                raise WorkspaceError(
                    f"No workspace at {path}.", hint="Run `mipo-local init` first (or pass --workspace DIR)."
                )
            try:
                private_dir(path)
            except OSError as err:
                raise WorkspaceError(
                    f"Cannot create the workspace {path}: {err.strerror or err}.",
                    hint="Choose a folder you can write to with --workspace (or MIPO_LOCAL_HOME).",
                ) from err
        ws = cls(path, read_only=not _writable(path))
        ws._migrate()
        if not ws.read_only:
            for sub in ("models", "runs", "exports", "evals"):
                private_dir(path / sub)
        return ws

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            new_file = not self.db_path.exists()
            if self.read_only:
                # immutable: nothing can change the file here, and SQLite must not try to create its
                # WAL index beside it.
                uri = f"file:{urllib.parse.quote(str(self.db_path))}?mode=ro&immutable=1"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None)
                conn.row_factory = sqlite3.Row
                self._local.conn = conn
                return conn
            # A long busy timeout: a second process waits for a writer instead of seeing "database is locked".
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # set once, not on every open
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            if new_file:
                os.chmod(self.db_path, PRIVATE_FILE)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it lands, or none of it."""
        if self.read_only:
            raise WorkspaceError(
                f"The workspace {self.root} is read-only (a read-only file system or folder), so this "
                "command cannot change it.",
                hint="Commands that only show things still work; copy the workspace somewhere writable to change it.",
            )
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self._connect().execute(sql, params).fetchall()

    def _migrate(self) -> None:
        """Bring the schema up to date. A current workspace is only read: opening it writes nothing."""
        version = self._connect().execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise WorkspaceError(
                f"The workspace {self.root} was written by a newer mipo-local (schema {version}).",
                hint="Upgrade mipo-local to open it.",
            )
        if version == SCHEMA_VERSION:
            return
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            # executescript() would commit mid-transaction, so statements run one by one.
            for step in range(version, SCHEMA_VERSION):
                for statement in _split_sql(MIGRATIONS[step]):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        for suffix in ("-wal", "-shm"):
            extra = Path(str(self.db_path) + suffix)
            if extra.exists():
                os.chmod(extra, PRIVATE_FILE)

    # -- config --------------------------------------------------------------------------------

    def get_config(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM config WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_config(self, key: str, value: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO config(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    # -- contexts ------------------------------------------------------------------------------

    def add_context(self, text: str, label: str | None = None) -> Context:
        text = self._checked_texts([text], "The context", CONTEXT_CHARS_MAX, CONTEXT_TOKENS_MAX, _ABOUT_YOU)[
            0
        ]
        label = check_label(label)
        now = _now()
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO contexts(text, label, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (text, label, now, now),
            )
        return Context(cur.lastrowid, text, label, now)

    def update_context(self, context_id: int, text: str) -> None:
        text = self._checked_texts([text], "The context", CONTEXT_CHARS_MAX, CONTEXT_TOKENS_MAX, _ABOUT_YOU)[
            0
        ]
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE contexts SET text = ?, updated_at = ? WHERE id = ?", (text, _now(), context_id)
            )
            if cur.rowcount == 0:
                raise UserInputError(f"There is no context with id {context_id}.")

    def _checked_texts(
        self, texts: list[str], what: str, max_chars: int, max_tokens: int, empty_hint: str
    ) -> list[str]:
        """The texts as stored, each checked (validation.check_text), then counted in tokens of the base
        model when the workspace has one: a text the model cannot read in one go is refused here, not
        tokenized again and skipped on every `pairs` run."""
        where = (lambda i: f" (item {i + 1})") if len(texts) > 1 else (lambda i: "")
        cleaned = [check_text(t, what, max_chars, empty_hint, where(i)) for i, t in enumerate(texts)]
        tokenizer = self._tokenizer()
        if tokenizer is not None:
            for i, text in enumerate(cleaned):
                n = len(tokenizer.encode_text(text))
                if n > max_tokens:
                    raise UserInputError(
                        f"{what}{where(i)} is {n:,} tokens long; the limit is {max_tokens:,} tokens of the base model."
                    )
        return cleaned

    def _tokenizer(self):
        """The base model's tokenizer, or None before `init` has set a base model."""
        from . import modelsource  # modelsource builds on the workspace, not the other way round
        from .chat import chat_format
        from .errors import MipoError

        try:
            return chat_format(str(modelsource.base_model(self).file)).tokenizer
        except MipoError:
            return None

    def contexts(self) -> list[Context]:
        return [
            Context(r["id"], r["text"], r["label"], r["created_at"])
            for r in self.query("SELECT * FROM contexts ORDER BY id")
        ]

    def remove_context(self, context_id: int) -> None:
        with self.transaction() as conn:
            if conn.execute("DELETE FROM contexts WHERE id = ?", (context_id,)).rowcount == 0:
                raise UserInputError(f"There is no context with id {context_id}.")

    # -- prompts -------------------------------------------------------------------------------

    def add_prompts(self, texts: list[str], source: str = "user") -> tuple[list[Prompt], list[str]]:
        """Add prompts in one transaction. Returns (added, duplicates); empty texts are an error."""
        cleaned = self._checked_texts(
            texts, "The prompt", PROMPT_CHARS_MAX, PROMPT_TOKENS_MAX, "write the question you would ask"
        )
        added: list[Prompt] = []
        duplicates: list[str] = []
        now = _now()
        with self.transaction() as conn:
            for text in cleaned:
                cur = conn.execute(
                    "INSERT INTO prompts(text, source, created_at) VALUES (?, ?, ?) ON CONFLICT(text) DO NOTHING",
                    (text, source, now),
                )
                if cur.rowcount == 0:
                    duplicates.append(text)
                else:
                    added.append(Prompt(cur.lastrowid, text, source, now))
        return added, duplicates

    def prompts(self, source: str | None = None) -> list[Prompt]:
        sql, params = "SELECT * FROM prompts", ()
        if source:
            sql, params = sql + " WHERE source = ?", (source,)
        return [
            Prompt(r["id"], r["text"], r["source"], r["created_at"])
            for r in self.query(sql + " ORDER BY id", params)
        ]

    def remove_prompt(self, prompt_id: int) -> None:
        self.remove_prompts([prompt_id])

    def remove_prompts(self, ids: list[int], ranges: list[tuple[int, int]] = ()) -> int:
        """Delete prompts in one transaction: each of `ids` must exist; ranges take what exists in them.
        Returns how many were deleted. Pairs made from them keep their copy of the text."""
        with self.transaction() as conn:
            missing = [
                i for i in ids if conn.execute("SELECT 1 FROM prompts WHERE id = ?", (i,)).fetchone() is None
            ]
            if missing:
                raise UserInputError(f"There is no prompt with id {missing[0]}.")
            n = sum(
                conn.execute("DELETE FROM prompts WHERE id = ?", (i,)).rowcount for i in dict.fromkeys(ids)
            )
            for first, last in ranges:
                n += conn.execute("DELETE FROM prompts WHERE id BETWEEN ? AND ?", (first, last)).rowcount
        return n

    # -- counts and status ---------------------------------------------------------------------

    def count(self, table: str) -> int:
        if table not in {"contexts", "prompts", "pairs", "runs", "exports", "evals"}:
            raise ValueError(table)
        return self.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]

    # -- jobs: one long job of a kind per workspace ----------------------------------------------

    @contextmanager
    def job(self, kind: str, description: str) -> Iterator[None]:
        """Hold the workspace's lock for a long job of `kind`; a second one is refused, naming the first.

        A lock left by a process that died (kill -9) is taken over, so a rerun can resume.
        """
        host = os.uname().nodename
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE kind = ?", (kind,)).fetchone()
            if row is not None and row["pid"] != os.getpid() and _pid_alive(row["pid"], row["host"], host):
                started = time.strftime("%H:%M:%S", time.localtime(row["started_at"]))
                raise JobBusyError(
                    f"Another {kind} job is already running on this workspace "
                    f"(process {row['pid']}, started {started}: {row['description']}).",
                    hint="Wait for it to finish or stop it first.",
                )
            conn.execute(
                "INSERT OR REPLACE INTO jobs(kind, pid, host, description, started_at) VALUES (?, ?, ?, ?, ?)",
                (kind, os.getpid(), host, description, _now()),
            )
        self._sweep_scratch_dirs()
        try:
            yield
        finally:
            with self.transaction() as conn:
                conn.execute("DELETE FROM jobs WHERE kind = ? AND pid = ?", (kind, os.getpid()))

    # -- temp folders outside the workspace --------------------------------------------------------

    SCRATCH_KEY = "scratch_dirs"

    def remember_scratch_dir(self, folder: Path) -> None:
        """Note a folder outside the workspace where a job writes temp files (`export --out DIR`), so
        what a killed job left there is removed when the next job of any kind starts."""
        folder = str(Path(folder).resolve())
        known = self.get_config(self.SCRATCH_KEY, [])
        if folder not in known:
            self.set_config(self.SCRATCH_KEY, [*known, folder])

    def _sweep_scratch_dirs(self) -> None:
        known = self.get_config(self.SCRATCH_KEY, [])
        for folder in known:
            remove_stale_temps(Path(folder))
        alive = [f for f in known if Path(f).is_dir()]
        if alive != known:
            self.set_config(self.SCRATCH_KEY, alive)

    def running_jobs(self) -> list[dict]:
        host = os.uname().nodename
        return [dict(r) for r in self.query("SELECT * FROM jobs") if _pid_alive(r["pid"], r["host"], host)]


def _writable(path: Path) -> bool:
    """Whether the workspace folder and its database can be written (False on a read-only file system or
    an immutable folder, where even root may not write)."""
    db = path / DB_NAME
    return os.access(path, os.W_OK) and (not db.exists() or os.access(db, os.W_OK))


def _pid_alive(pid: int, lock_host: str, this_host: str) -> bool:
    # Another machine's process cannot be checked: assume it runs.
    return lock_host != this_host or pid_alive(pid)


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (none of ours contain ';' inside a literal)."""
    statements = []
    for part in script.split(";"):
        lines = [ln for ln in part.splitlines() if ln.strip() and not ln.strip().startswith("--")]
        if lines:
            statements.append("\n".join(lines))
    return statements
