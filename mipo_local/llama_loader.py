"""Load llama.cpp models quietly and with clear errors. The only place that constructs `Llama`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import ModelError

_LOG_CALLBACK = None


def _quiet() -> None:
    """Route llama.cpp's C-level log lines to Python logging at debug level, off the user's terminal."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import llama_cpp

    log = logging.getLogger("mipo_local.llama_cpp")

    @llama_cpp.llama_log_callback
    def _callback(level, text, user_data):  # noqa: ARG001
        log.debug(text.decode("utf-8", errors="replace").rstrip())

    _LOG_CALLBACK = _callback  # keep a reference: ctypes would free it otherwise
    llama_cpp.llama_log_set(_callback, None)


def load_llama(path: str | os.PathLike, **kwargs: Any):
    """Return a `llama_cpp.Llama` for `path`; raise ModelError with one sentence when it cannot load."""
    from llama_cpp import Llama

    _quiet()
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"Model file not found: {path}.", hint="Run `mipo-local init` to prepare the model again."
        )
    kwargs.setdefault("verbose", False)
    try:
        return Llama(str(path), **kwargs)
    except (ValueError, RuntimeError, OSError) as err:
        raise ModelError(f"llama.cpp could not load {path}: {err}.") from err
