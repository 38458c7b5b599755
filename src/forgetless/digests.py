"""What a local file or folder holds, as a sha256.

A stage is cached under the fingerprint of its settings. A setting that names a user's file or
a local checkpoint by its path would let an edited file or a retrained model reuse results
computed from the old bytes, a silently wrong result; so the fingerprint takes the content's
digest in place of the path (``schema.LOCAL_CONTENT``), and a moved or copied file, or a run
directory on another machine, keeps its cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from forgetless.errors import ForgetlessError
from forgetless.io import write_json_atomic
from forgetless.paths import cache_dir

# Reading a 16 GB checkpoint takes most of a minute, on every command that plans a stage with
# it: the digests of large files are kept in the user cache, keyed by path, size and mtime as
# git's index keys its entries, so a rerun reads none of them again.
LARGE_FILE_BYTES = 64 << 20
DIGEST_CACHE = "file_digests.json"
# Within a process, a folder's digest is reused while every file's size and mtime stay the same.
_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    try:
        stat = path.stat()
        if stat.st_size < LARGE_FILE_BYTES:
            return read_sha256(path)
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        known = _cached_digests()
        if key not in known:
            known[key] = read_sha256(path)
            _remember(known)
        return known[key]
    except OSError as error:
        raise ForgetlessError(f"cannot read {path}: {error.strerror or error}") from None


def read_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read now (no cache)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remember(known: dict[str, str]) -> None:
    try:
        write_json_atomic(cache_dir() / DIGEST_CACHE, known)
    except OSError:
        pass  # a read-only cache only costs the next command the same read


def _cached_digests() -> dict[str, str]:
    try:
        known = json.loads((cache_dir() / DIGEST_CACHE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: digests are computed again
    return known if isinstance(known, dict) else {}


def content_sha256(path: str | Path, *, top_level_only: bool = False) -> str:
    """A file's sha256, or a folder's: the relative names and bytes of its files in name
    order, hidden ones (``.cache``, ``.git``) left out. ``top_level_only`` reads only the
    folder's own files, all that ``from_pretrained`` loads of a checkpoint, so a trainer's
    output folder is not hashed with every ``checkpoint-*`` below it."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        files = [root]
    else:
        candidates = root.iterdir() if top_level_only else root.rglob("*")
        files = sorted(
            file for file in candidates if file.is_file() and not _hidden(file.relative_to(root))
        )
    stamp = (str(root), *((str(file), *_size_and_mtime(file)) for file in files))
    if stamp not in _DIGESTS:
        if root.is_file():
            _DIGESTS[stamp] = file_sha256(root)
        else:
            digest = hashlib.sha256()
            for file in files:
                name = file.relative_to(root).as_posix()
                digest.update(f"{name}\0{file_sha256(file)}\n".encode())
            _DIGESTS[stamp] = digest.hexdigest()
    return _DIGESTS[stamp]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _size_and_mtime(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def local_content(name: str, *, checkpoint: bool = False) -> tuple[str, str] | None:
    """``(path, digest)`` if ``name`` names a local file or folder, as it is or read as a task
    or source spec, ``[ppl:]<path>[@<split>]``; None for data set names, hub ids and aliases,
    which name no local path. A ``checkpoint`` folder counts its own files only."""
    body = name.removeprefix("ppl:")
    for candidate in dict.fromkeys([name, body, body.rpartition("@")[0] or body]):
        path = Path(candidate).expanduser() if candidate else None
        # Only files and folders hold content; a device or pipe is the reader's to refuse.
        if path is not None and (path.is_file() or path.is_dir()):
            return candidate, content_sha256(candidate, top_level_only=checkpoint)
    return None
