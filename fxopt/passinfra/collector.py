"""Garbage collection during a compile: scan only what the compile made.

A compile makes and drops many reference cycles (copies of graphs, onnx-graphsurgeon's graph, the
exporter's objects), and each of Python's full collections walks every object of the process: the
user's model, its modules, torch's own. `young_objects_only` moves everything alive when a compile
starts out of the collector's sight (`gc.freeze`) and gives it back at the end, so a collection
during the compile walks the compile's own objects alone. Cycles the compile makes are collected as
before; garbage that existed before it waits for the next collection after it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["young_objects_only", "collect_young"]

_lock = threading.Lock()
_depth = 0
_froze = False  # this module froze the objects (and so gives them back)


@contextlib.contextmanager
def young_objects_only() -> Iterator[None]:
    """While the block runs, a collection scans only the objects made since the outermost such
    block began. Nests and may be entered from several threads (the last to leave gives the objects
    back); does nothing where other code froze objects (`gc.get_freeze_count`), whose freeze it
    must not undo.

    Example:
        >>> import gc
        >>> with young_objects_only():
        ...     frozen = gc.get_freeze_count() > 0
        >>> frozen, gc.get_freeze_count()
        (True, 0)
    """
    global _depth, _froze
    with _lock:
        if _depth == 0 and gc.get_freeze_count() == 0:
            gc.freeze()
            _froze = True
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _froze:
                gc.unfreeze()
                _froze = False


def collect_young() -> None:
    """Free now the reference cycles made inside the current `young_objects_only` block (a full
    collection where there is none)."""
    with young_objects_only():
        gc.collect()
