"""A compile's output folder: written whole or not at all, and checked against its manifest.

`write_output_folder` writes every file into a fresh temporary folder beside the target and
swaps it in, so the folder always holds one consistent compile: never a new manifest beside an
old build plan, never a manifest whose SHA-256 does not match its model.onnx.
`verify_output_folder` (``fxopt verify DIR``) checks a saved folder against its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping

from fxopt.errors import InputError
from fxopt.files import current_umask, write_atomic

__all__ = ["FXOPT_FILES", "MANIFEST", "verify_output_folder", "write_output_folder"]

MANIFEST = "manifest.json"
# Names a compile writes; a folder holding only these (or what its manifest lists) may be replaced.
FXOPT_FILES = frozenset({
    "model.onnx", "report.md", "report.json", MANIFEST, "build_engine.sh", "build_engine.py", "placement.md",
})
EXECUTABLE = frozenset({"build_engine.sh"})


def _listed_files(directory: str) -> set[str]:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return set(json.load(f).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def check_output_folder(directory: str) -> None:
    """Refuse a destination that is not a folder fxopt may replace, before any work is done.

    Raises:
        InputError: `directory` (or a parent) is a file, it is a folder holding files that
            no fxopt compile wrote (they would be lost by the swap), or the folder its files are
            staged in cannot be written (``/proc/x``, a read-only mount).
    """
    path = os.path.abspath(directory)
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != path and not os.path.isdir(parent):
        raise InputError(f"cannot save into '{directory}': '{parent}' is a file, not a directory")
    _check_writable(directory, parent if parent != path else os.path.dirname(path))
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise InputError(f"cannot save into '{directory}': it exists and is not a directory")
    foreign = sorted(set(os.listdir(path)) - FXOPT_FILES - _listed_files(path))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"cannot save into '{directory}': it holds files no fxopt compile wrote ({shown}); "
            "saving replaces the whole folder, so choose an empty or new folder"
        )


def _check_writable(directory: str, folder: str) -> None:
    # saving stages a folder beside the destination: try that once (and remove it) rather than
    # trust os.access, which says yes to root on /proc
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".fxopt-write-check-"))
    except OSError as exc:
        raise InputError(f"cannot save into '{directory}': '{folder}' cannot be written ({exc.strerror or exc}); "
                         "choose a writable folder") from exc


def write_output_folder(directory: str | os.PathLike[str], files: Mapping[str, bytes | str], manifest: dict) -> dict[str, str]:
    """Write `files` and `manifest.json` (with every file's SHA-256 and size) as one folder.

    The files go into a temporary folder beside `directory`, which then replaces it; an
    interruption leaves the old folder (or, between the two renames, none), never a mix.

    Returns:
        The final path of each file, by name.

    Raises:
        InputError: see `check_output_folder`.
    """
    directory = os.path.abspath(os.fspath(directory))
    check_output_folder(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.fxopt-new-")
    try:
        listed = {}
        for name, data in files.items():
            payload = data.encode("utf-8") if isinstance(data, str) else data
            write_atomic(os.path.join(staging, name), payload, executable=name in EXECUTABLE)
            listed[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        write_atomic(os.path.join(staging, MANIFEST), json.dumps({**manifest, "files": listed}, indent=2, default=str))
        os.chmod(staging, 0o777 & ~current_umask())
        _swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: os.path.join(directory, name) for name in [*files, MANIFEST]}


def _swap_in(staging: str, directory: str) -> None:
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=f".{os.path.basename(directory)}.fxopt-old-")
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def verify_output_folder(directory: str | os.PathLike[str]) -> list[str]:
    """Problems found checking a saved folder against its manifest (empty: consistent).

    Checks that the manifest exists and parses, that every file it lists exists with the
    recorded size and SHA-256, that no other file is there, and that model.onnx passes
    `onnx.checker`.

    Example:
        >>> import tempfile, os
        >>> folder = os.path.join(tempfile.mkdtemp(), "out")
        >>> _ = write_output_folder(folder, {"report.md": "# hi"}, {"precision": "fp32"})
        >>> verify_output_folder(folder)
        []
        >>> _ = open(os.path.join(folder, "report.md"), "a").write("edited")
        >>> verify_output_folder(folder)
        ['report.md: SHA-256 differs from the manifest (size 10, manifest says 4)']
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return [f"'{directory}' is not a folder"]
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST}: missing or unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    for name, entry in sorted(listed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            problems.append(f"{name}: SHA-256 differs from the manifest (size {len(data)}, manifest says {entry.get('bytes')})")
    extra = sorted(set(os.listdir(directory)) - set(listed) - {MANIFEST})
    problems += [f"{name}: not listed in the manifest (left from another compile?)" for name in extra]
    if "model.onnx" in listed and not any(p.startswith("model.onnx") for p in problems):
        import onnx

        try:
            onnx.checker.check_model(os.path.join(directory, "model.onnx"), full_check=True)
        except Exception as exc:  # noqa: BLE001 - any checker failure is a problem to report
            problems.append(f"model.onnx: onnx.checker rejects it: {str(exc).splitlines()[0][:200]}")
    return problems
