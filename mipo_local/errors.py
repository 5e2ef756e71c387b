"""One error hierarchy. Each error carries one user-facing sentence.

The CLI turns a MipoError into a single `Error: ...` line and a non-zero exit; the TUI shows it as a
notification. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MipoError(Exception):
    """Base class: `str(err)` is the sentence shown to the user."""

    exit_code = 1
    title = "Error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class UserInputError(MipoError):
    """Bad input from the user: a flag, a text, a file's content."""

    exit_code = 2
    title = "Invalid input"


class ModelError(MipoError):
    """A model file that is missing, unreadable, truncated or unsupported."""

    title = "Model problem"


class WorkspaceError(MipoError):
    """The workspace is missing, busy, or in a state that forbids the action."""

    title = "Workspace problem"


class JobBusyError(WorkspaceError):
    """Another process already runs a job of the same kind on this workspace."""

    title = "Job already running"


class NetworkError(MipoError):
    """A download failed (no network, offline mode, unknown repository)."""

    title = "Network problem"


class TrainingError(MipoError):
    """Training stopped: NaN loss, out of memory, a corrupt checkpoint."""

    title = "Training stopped"


class ExportError(MipoError):
    """Export could not produce a valid file."""

    title = "Export failed"


class Cancelled(MipoError):
    """The user cancelled a job; what it finished is kept."""

    exit_code = 130
    title = "Cancelled"
