"""Keeping Python's cyclic garbage collector out of a save or a load.

A save or a load allocates thousands of small acyclic objects (field maps, state
objects, tuples) in a few milliseconds, while the device is stopped. Every 700
allocations the cyclic collector runs a generation-0 pass, and now and then a full
pass over the whole heap that can take longer than the save and load together;
either lands in the migration's downtime. None of these objects form cycles, so
reference counting frees them all; the collector only has to wait until the
device runs again.

:func:`gc_paused` disables the collector for the duration of a block and restores
the previous setting when the last of any concurrent or nested blocks ends. A
process that keeps the collector disabled keeps it disabled.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]

_lock = threading.Lock()
_depth = 0
_restore = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic garbage collector for the duration of the block.

    Nested and concurrent blocks (other threads) share one pause: the collector is
    re-enabled, if it was enabled before the first block began, when the last one
    ends (also when it ends with an exception).
    """
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _restore:
                gc.enable()
