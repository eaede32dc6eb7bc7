"""Progress on stderr for every phase of a compile (tracing, shape propagation, passes, export,
verification), refreshed while a long phase runs so a huge input never looks like a hang."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["Phases"]


class Phases:
    """A one-line bar over named phases; the current phase and its elapsed time stay live.

    Args:
        names: the phases in order.
        enabled: ``False`` makes every call a no-op (no thread, no output).

    Example:
        >>> phases = Phases(["trace", "export"], enabled=False)
        >>> with phases("trace"):
        ...     pass
    """

    REFRESH_S = 0.5

    def __init__(self, names: Sequence[str], *, enabled: bool = True, desc: str = "fxopt") -> None:
        self.enabled = enabled
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(names), desc=desc, unit="phase", leave=False, bar_format="{desc}: {n}/{total} phases [{elapsed}] {postfix}")

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.bar.set_postfix_str(name)
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
            self.bar.update(1)

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.REFRESH_S):
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
