"""Writing files safely: every file fxopt writes goes through a temporary file and a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

__all__ = ["byte_chunks", "current_umask", "write_atomic"]


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def byte_chunks(data: bytes | str | Iterable[bytes]) -> Iterable[bytes]:
    """`data` as pieces of bytes: text encoded as UTF-8, bytes as one piece, an iterable of pieces as it is."""
    if isinstance(data, str):
        return [data.encode("utf-8")]
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


def write_atomic(path: str | os.PathLike[str], data: bytes | str | Iterable[bytes], *, executable: bool = False) -> None:
    """Write `data` (bytes, text, or an iterable of byte chunks written one after the other, so a large file need not
    be in memory at once) to `path` via a temporary file in the same folder and `os.replace`.

    A crash or error midway leaves either the old file or none, never half a file. The file
    gets the usual permissions (0644 under the common umask; 0755 when `executable`).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fxopt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in byte_chunks(data):
                f.write(chunk)
        os.chmod(tmp, (0o777 if executable else 0o666) & ~current_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
