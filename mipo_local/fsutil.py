"""Private, atomic file-system helpers: every write is temp file + rename, every path owner-only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WorkspaceError

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600

# Temp names carry the writer's pid (".TARGET.p<pid>.<random>.part"), so one left by a killed process can be
# told from one still being written and removed by the next writer in the same folder.
_TEMP_NAME = re.compile(r"^\..+\.p(\d+)\.[^.]+\.part$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this machine is running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def remove_stale_temps(directory: Path) -> None:
    """Remove the temp files and folders that a killed writer (kill -9, power loss) left in `directory`."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TEMP_NAME.match(entry.name)
            if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.p{os.getpid()}."


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it owner-only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)
    return path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is fsynced and renamed over `target`.

    On any exception the temp file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, PRIVATE_FILE)
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            if tmp_path.is_dir():
                shutil.rmtree(tmp_path)
            else:
                tmp_path.unlink()
        if disk_full(exc, target.parent):
            raise disk_full_error(target) from exc
        raise


def disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether `exc` is a write that failed for lack of space. numpy's tofile reports a short write as an
    OSError without errno, so an errno-less OSError on a file system with (almost) no room counts too."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return exc.errno is None and free_bytes(directory) < FULL_BELOW


FULL_BELOW = 1 << 20  # a file system with less than 1 MiB free is full for any model file


def free_bytes(directory: Path) -> int:
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 1 << 62


def disk_full_error(target: Path) -> WorkspaceError:
    return WorkspaceError(
        f"The disk is full: {target} could not be written; nothing was half-written. "
        "Free some disk space and run the same command again."
    )


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Raise before writing when `directory`'s file system has less than `needed_bytes` free."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise WorkspaceError(
            f"Not enough free disk space in {directory} for {what}: "
            f"{needed_bytes / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free."
        )


def require_writable_dir(directory: Path, flag: str) -> None:
    """Raise before any work when files cannot be created in `directory` (read-only, /proc, no such
    parent): a free-space figure for such a place would be meaningless."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mipo-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise WorkspaceError(
            f"{flag}: cannot create files in {directory} ({err.strerror or err}); choose a folder you can write to."
        ) from err


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a private temp directory beside `target`; on success it replaces `target` in one rename.

    An existing `target` is moved aside first and removed after the swap, so readers see the old or the new
    directory, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".part", dir=target.parent))
    os.chmod(tmp, PRIVATE_DIR)
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc, target.parent):
            raise disk_full_error(target) from exc
        raise


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not the machine's count: llama.cpp's
    threads spin at every barrier, so one thread more than there are cores slows decoding many times over."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1
