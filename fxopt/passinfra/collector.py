"""Garbage collection during a compile: scan only what the compile made.

A compile makes and drops many reference cycles (copies of graphs, onnx-graphsurgeon's graph, the
exporter's objects), and each of Python's full collections walks every object of the process: the
user's model, its modules, torch's own. `young_objects_only` moves everything alive when a compile
starts out of the collector's sight (`gc.freeze`) and gives it back at the end, so a collection
during the compile walks the compile's own objects alone. Cycles the compile makes are collected as
before. Garbage that existed before the outermost block is collected as it begins (one full walk per
compile instead of many), unless a full collection already ran since the previous block ended and the
compile's model is small (`COLLECT_FIRST_MIN_BYTES`): then that walk of the whole process (0.1-0.4 s on
a 2-core host, more than some compiles' passes) would free nothing of an earlier compile's, and is
skipped. Compiles in a loop with no collection between them still collect each time: the objects a
block freezes cannot be collected inside the next one, so an earlier compile's garbage would otherwise
pile up while every automatic full collection ran inside a compile.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["COLLECT_FIRST_MIN_BYTES", "young_objects_only", "collect_young"]

COLLECT_FIRST_MIN_BYTES = 64 << 20  # a compile of a model with this many bytes of weights always collects everything first

_lock = threading.Lock()
_depth = 0
_frozen_by_us = 0  # the freeze count right after this module froze (0: it did not)
_collected_since_block = False  # a full collection of every object ran after the last outermost block ended


def _note_full_collection(phase: str, info: dict) -> None:
    global _collected_since_block
    if phase == "stop" and info.get("generation") == 2 and not _frozen_by_us:
        _collected_since_block = True


gc.callbacks.append(_note_full_collection)


@contextlib.contextmanager
def young_objects_only(collect_first: bool | None = True) -> Iterator[None]:
    """While the block runs, a collection scans only the objects made since the outermost such
    block began. That block first collects everything (garbage from before it would otherwise
    outlive it; ``collect_first=False`` skips that full walk for a short block, such as one export
    in a loop of them; ``None`` skips it where a full collection already ran since the previous
    block ended), then freezes what is alive. Nests and may be entered from several threads (the
    last to leave gives the objects back); does nothing where other code froze objects
    (`gc.get_freeze_count`), and gives nothing back where other code froze more meanwhile: that
    code's freeze is not undone.

    Example:
        >>> import gc
        >>> with young_objects_only():
        ...     frozen = gc.get_freeze_count() > 0
        >>> frozen, gc.get_freeze_count()
        (True, 0)
    """
    global _depth, _frozen_by_us, _collected_since_block
    with _lock:
        if _depth == 0 and gc.get_freeze_count() == 0:
            if collect_first or (collect_first is None and not _collected_since_block):
                gc.collect()
            gc.freeze()
            _frozen_by_us = gc.get_freeze_count()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _frozen_by_us:
                if gc.get_freeze_count() <= _frozen_by_us:  # frozen objects only leave (freed); more: someone froze too
                    gc.unfreeze()
                _frozen_by_us = 0
                _collected_since_block = False  # the block's own garbage is now collectable, and not yet collected


def collect_young() -> None:
    """Free now the reference cycles made inside the current `young_objects_only` block (outside
    one, a full collection)."""
    gc.collect()
