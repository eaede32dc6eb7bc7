"""Artefacts between pipeline nodes: folders of files with SHA-256 digests and a fingerprint.

A node never hands a live ``nn.Module`` to the next: it writes a folder under the run's store,
named by its fingerprint (fxopt's version, the node's code and configuration, its inputs'
digests), and returns a small JSON-able record ``{node, path, sha256, fingerprint}``. A reader
checks the folder against the record's digest before use, so a corrupted entry is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fxopt.automation.errors import CorruptArtefactError
from fxopt.output.files import write_atomic

__all__ = ["ARTEFACT_META", "ArtefactStore", "fingerprint", "tree_digest"]

# written last into every artefact folder: its files' digests, fingerprint and summary
ARTEFACT_META = ".artefact.json"


def fingerprint(payload: Any) -> str:
    """SHA-256 of a JSON-able payload in canonical form (sorted keys).

    Example:
        >>> fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ARTEFACT_META
    }


def tree_digest(files: dict[str, str]) -> str:
    """One SHA-256 over ``{relative path: file sha256}`` (the folder's content, names included)."""
    return fingerprint(sorted(files.items()))


class ArtefactStore:
    """Artefact folders under ``root``: ``root/<node>/<fingerprint[:20]>/``.

    Records carry paths relative to ``root``, so a whole run folder can be moved or copied.

    Example:
        >>> import tempfile
        >>> store = ArtefactStore(tempfile.mkdtemp())
        >>> record = store.produce("demo", "f" * 64, lambda out: (out / "x.txt").write_text("hi"), {"n": 1})
        >>> store.check(record)["summary"]
        {'n': 1}
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def folder(self, record: dict[str, Any]) -> Path:
        """The artefact folder a record names."""
        return self.root / record["path"]

    def produce(self, node: str, fp: str, write: Any, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``write(folder)`` into a fresh staging folder and swap it in under the fingerprint.

        ``write`` may return a dict, merged into the summary. A crash midway leaves no folder
        under the final name, so a half-written artefact is never taken for a finished one.
        """
        rel = Path(node) / fp[:20]
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=".staging-"))
        try:
            start = time.perf_counter()
            extra = write(staging)
            summary = {**(summary or {}), **(extra if isinstance(extra, dict) else {})}
            files = _file_digests(staging)
            meta = {"node": node, "fingerprint": fp, "sha256": tree_digest(files), "files": files, "summary": summary,
                    "seconds": time.perf_counter() - start}
            write_atomic(staging / ARTEFACT_META, json.dumps(meta, indent=1, sort_keys=True, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return {"node": node, "path": rel.as_posix(), "sha256": meta["sha256"], "fingerprint": fp}

    def existing(self, node: str, fp: str) -> dict[str, Any] | None:
        """The record of an intact artefact already stored under this fingerprint, else None."""
        rel = (Path(node) / fp[:20]).as_posix()
        meta_path = self.root / rel / ARTEFACT_META
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        record = {"node": node, "path": rel, "sha256": meta.get("sha256"), "fingerprint": fp}
        return record if meta.get("fingerprint") == fp and self.intact(record) else None

    def intact(self, record: dict[str, Any]) -> bool:
        """Whether the folder's files still hash to the record's digest."""
        try:
            self.check(record)
        except CorruptArtefactError:
            return False
        return True

    def check(self, record: dict[str, Any]) -> dict[str, Any]:
        """The artefact's metadata, after checking every file against the record's digest.

        Raises:
            CorruptArtefactError: a file is missing, added or changed, or the metadata is unreadable.
        """
        folder = self.folder(record)
        try:
            meta = json.loads((folder / ARTEFACT_META).read_text())
        except (OSError, ValueError) as error:
            raise CorruptArtefactError(record["node"], f"artefact of '{record['node']}' at {folder} is unreadable "
                                       f"({type(error).__name__}); it will be recomputed") from None
        files = _file_digests(folder) if folder.is_dir() else {}
        if tree_digest(files) != record["sha256"] or meta.get("sha256") != record["sha256"]:
            changed = sorted(k for k in set(files) | set(meta.get("files", {})) if files.get(k) != meta.get("files", {}).get(k))
            raise CorruptArtefactError(
                record["node"], f"artefact of '{record['node']}' at {folder} does not match its digest "
                f"(changed: {', '.join(changed) or 'metadata'}); it will be recomputed")
        return meta
