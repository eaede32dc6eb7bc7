"""A compile's output folder: written whole or not at all, and checked against its manifest.

`write_output_folder` writes every file into a fresh temporary folder beside the target and
swaps it in, so the folder always holds one consistent compile: never a new manifest beside an
old build plan, never a manifest whose SHA-256 does not match its model.onnx.
`verify_output_folder` (``fxopt verify DIR``) checks a saved folder against its manifest, and
the manifest against its own digest (`MANIFEST_DIGEST`), so an edit of any file is found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fxopt.errors import InputError
from fxopt.output.files import byte_chunks, current_umask, write_atomic

__all__ = ["FXOPT_FILES", "MANIFEST", "MANIFEST_DIGEST", "manifest_digest", "verify_output_folder", "write_output_folder"]

MANIFEST = "manifest.json"
# The manifest's own SHA-256, over its canonical content without this field (see manifest_digest).
MANIFEST_DIGEST = "manifest_sha256"
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
        raise InputError(f"cannot save into '{directory}': it holds {_describe_foreign(path, foreign)}; saving "
                         "replaces the whole folder, so choose an empty or new folder (one per compile)")


def _describe_foreign(path: str, names: list[str]) -> str:
    # another compile's folder inside this one is not "a file no compile wrote": say what it is
    def shown(group: list[str]) -> str:
        return ", ".join(group[:5]) + (f" and {len(group) - 5} more" if len(group) > 5 else "")

    folders = [name for name in names if os.path.isdir(os.path.join(path, name))]
    outputs = [f"{name}/" for name in folders if os.path.isfile(os.path.join(path, name, MANIFEST))]
    others = [f"{name}/" for name in folders if f"{name}/" not in outputs]
    files = [name for name in names if name not in folders]
    parts = [f"files no fxopt compile wrote ({shown(files)})"] if files else []
    parts += [f"output folders of other compiles ({shown(outputs)})"] if outputs else []
    parts += [f"folders no fxopt compile wrote ({shown(others)})"] if others else []
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def _check_writable(directory: str, folder: str) -> None:
    # saving stages a folder beside the destination: try that once (and remove it) rather than
    # trust os.access, which says yes to root on /proc
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".fxopt-write-check-"))
    except OSError as exc:
        raise InputError(f"cannot save into '{directory}': '{folder}' cannot be written ({exc.strerror or exc}); "
                         "choose a writable folder") from exc


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON, leaving out its own digest field.

    Canonical: keys sorted, no whitespace, non-ASCII escaped (``json.dumps(content,
    sort_keys=True, separators=(",", ":"))`` in UTF-8), so reformatting the file keeps
    the digest and any change of a value, key or list changes it. The digest finds edits, not
    forgeries: whoever edits the manifest can recompute it.

    Example:
        >>> manifest_digest({"target": "xavier"}) == manifest_digest({"target": "xavier", MANIFEST_DIGEST: "x"})
        True
        >>> manifest_digest({"target": "xavier"}) == manifest_digest({"target": "orin"})
        False
    """
    content = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    # digest what a reader will load: JSON's own types (default=str turns the rest into strings)
    content = json.loads(json.dumps(manifest, default=str))
    return json.dumps({**content, MANIFEST_DIGEST: manifest_digest(content)}, indent=2)


def _hashed(chunks: Iterable[bytes], digest: Any, size: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        size[0] += len(chunk)
        yield chunk


def write_output_folder(directory: str | os.PathLike[str], files: Mapping[str, bytes | str | Iterable[bytes]], manifest: dict) -> dict[str, str]:
    """Write `files` and `manifest.json` (with every file's SHA-256 and size, and its own) as one folder.

    A file given as an iterable of byte chunks (a large model: `fxopt.output.onnx_weights.chunks`) is written and
    hashed chunk by chunk, never whole in memory.

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
            digest, size = hashlib.sha256(), [0]
            write_atomic(os.path.join(staging, name), _hashed(byte_chunks(data), digest, size), executable=name in EXECUTABLE)
            listed[name] = {"sha256": digest.hexdigest(), "bytes": size[0]}
        write_atomic(os.path.join(staging, MANIFEST), _manifest_text({**manifest, "files": listed}))
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

    Checks that the manifest exists and parses, that its content matches its own digest
    (`MANIFEST_DIGEST`; a manifest without one, from before manifests covered themselves or
    with the field removed, is a problem saying so), that every file it lists exists with the
    recorded SHA-256, that no other file is there, and that model.onnx passes `onnx.checker`.

    Example:
        >>> import json, tempfile, os
        >>> folder = os.path.join(tempfile.mkdtemp(), "out")
        >>> _ = write_output_folder(folder, {"report.md": "# hi"}, {"target": {"name": "xavier"}})
        >>> verify_output_folder(folder)
        []
        >>> _ = open(os.path.join(folder, "report.md"), "a").write("edited")
        >>> verify_output_folder(folder)
        ['report.md: SHA-256 differs from the manifest (size 10, manifest says 4)']
        >>> path = os.path.join(folder, "manifest.json")
        >>> text = open(path).read().replace('"xavier"', '"orin"')
        >>> _ = open(path, "w").write(text)
        >>> print(verify_output_folder(folder)[0])
        manifest.json: edited after it was written: its content no longer matches its own SHA-256 (manifest_sha256); ...
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return [f"'{directory}' is not a folder"]
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f, object_pairs_hook=_refuse_duplicate_keys)
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError(f"'files' is a {type(listed).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST}: missing or unreadable ({type(exc).__name__}: {exc})"]
    problems = _self_digest_problems(manifest)
    for name, entry in sorted(listed.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        with open(path, "rb") as f:
            data = f.read()
        if not isinstance(entry, dict) or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            recorded = entry.get("bytes") if isinstance(entry, dict) else None
            problems.append(f"{name}: SHA-256 differs from the manifest (size {len(data)}, manifest says {recorded})")
    extra = sorted(set(os.listdir(directory)) - set(listed) - {MANIFEST})
    problems += [f"{name}: not listed in the manifest (left from another compile?)" for name in extra]
    if "model.onnx" in listed and not any(p.startswith("model.onnx") for p in problems):
        import onnx

        try:
            onnx.checker.check_model(os.path.join(directory, "model.onnx"), full_check=True)
        except Exception as exc:  # noqa: BLE001 - any checker failure is a problem to report
            problems.append(f"model.onnx: onnx.checker rejects it: {str(exc).splitlines()[0][:200]}")
    return problems


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; a reader that keeps the first would see another manifest
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"key {duplicated[0]!r} appears more than once")
    return dict(pairs)


def _self_digest_problems(manifest: dict[str, Any]) -> list[str]:
    recorded = manifest.get(MANIFEST_DIGEST)
    if recorded is None:
        versions = manifest.get("versions")
        writer = versions.get("fxopt") if isinstance(versions, dict) else None
        return [f"{MANIFEST}: has no {MANIFEST_DIGEST}, so an edit of {MANIFEST} itself (its target, passes, "
                f"safety evidence) cannot be found: written by fxopt {writer or '(version not recorded)'} before "
                f"manifests covered themselves, or the field was removed; the other files were checked against "
                f"it as it stands. Save the compile again for a manifest that covers itself"]
    if recorded != manifest_digest(manifest):
        return [f"{MANIFEST}: edited after it was written: its content no longer matches its own SHA-256 "
                f"({MANIFEST_DIGEST}); every field is covered (target, passes, safety evidence, the files' "
                f"digests), so compile and save again rather than edit it"]
    return []
