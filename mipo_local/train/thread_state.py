"""A thread-local value set for the length of a block (no imports beyond the standard library)."""

from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def set_for_block(state: threading.local, name: str, value):
    """`state.name` is `value` in this thread until the block ends, then what it was (unset reads as None)."""
    previous = getattr(state, name, None)
    setattr(state, name, value)
    try:
        yield
    finally:
        setattr(state, name, previous)
