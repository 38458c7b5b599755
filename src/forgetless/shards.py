"""Row-aligned arrays computed shard by shard and resumable: per-sample gradient features,
document embeddings.

A folder holds ``matrix.npy`` (memory-mapped, one row per sample), ``columns.npz`` (small
per-sample columns), ``ids.json`` (the sample ids, written once) and ``manifest.json`` (a
digest of the ids, what produced the rows, finished shards). A rerun with the same identity
continues at the first unfinished shard; a different identity starts over.

The manifest is rewritten after every shard, so it holds a digest of the ids rather than the
ids: a million ids rewritten per shard would cost more than the shard. Pages of the matrix
are dropped from the process's resident memory once written or read (``release_pages``), so
a pass over the rows holds one shard or block, not the file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_file, write_json_atomic

MATRIX_FILE = "matrix.npy"
COLUMNS_FILE = "columns.npz"
IDS_FILE = "ids.json"
MANIFEST_FILE = "manifest.json"


def ids_digest(ids: Sequence[str] | int) -> str:
    """A digest of the ids, or of the row count for rows identified by number alone."""
    if isinstance(ids, int):
        return f"rows:{ids}"
    digest = hashlib.sha256()
    for identifier in ids:
        digest.update(identifier.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def release_pages(matrix: np.ndarray) -> None:
    """Drop the pages of a memory-mapped matrix from this process's resident memory. The file
    and the page cache keep them (the mapping is shared), so nothing is lost: a later read
    faults them back in. Without this, every row ever touched stays resident, and a streamed
    pass over a million embeddings would hold all 1.5 GB of them. A plain array is left alone."""
    mapping = getattr(matrix, "_mmap", None)
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)


def row_blocks(matrix: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, block)`` over ``matrix`` in blocks of ``rows`` rows, each an in-memory
    copy; a memory map keeps one block resident at a time."""
    for start in range(0, len(matrix), rows):
        block = np.array(matrix[start : start + rows])
        release_pages(matrix)
        yield start, block


class ShardedRows:
    """``ids`` are the samples' ids (unique), or their count when rows are identified by
    their number alone (a pool read from one file: no million-string list to hold)."""

    def __init__(
        self,
        directory: str | Path,
        ids: Sequence[str] | int,
        identity: dict[str, Any],
        shard_size: int,
        width: int,
        dtype: np.dtype | type,
        columns: dict[str, np.dtype | type],
    ):
        count = ids if isinstance(ids, int) else len(ids)
        if not isinstance(ids, int) and len(set(ids)) != count:
            raise ForgetlessError("sample ids must be unique")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.count = count
        shards = (count + shard_size - 1) // shard_size
        expected = {"count": count, "ids": ids_digest(ids), "identity": identity, "shards": shards}
        self.manifest = {**expected, "done_shards": 0}
        manifest_file = self.directory / MANIFEST_FILE
        if manifest_file.is_file():
            previous = json.loads(manifest_file.read_text())
            if {key: previous.get(key) for key in expected} == expected:
                self.manifest = previous
        fresh = self.manifest["done_shards"] == 0
        self.matrix = np.lib.format.open_memmap(
            self.directory / MATRIX_FILE,
            mode="w+" if fresh else "r+",
            dtype=dtype,
            shape=(count, width),
        )
        columns_file = self.directory / COLUMNS_FILE
        if not fresh and columns_file.is_file():
            self.columns = {key: value.copy() for key, value in np.load(columns_file).items()}
        else:
            self.columns = {name: np.zeros(count, kind) for name, kind in columns.items()}
        if fresh:
            write_json_atomic(self.directory / IDS_FILE, None if isinstance(ids, int) else ids)
        write_json_atomic(manifest_file, self.manifest)

    @property
    def done(self) -> int:
        """Rows already computed (by an earlier, interrupted run)."""
        return min(self.count, self.manifest["done_shards"] * self.shard_size)

    def pending(self) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` of every shard still to compute."""
        return [
            (shard, shard * self.shard_size, min((shard + 1) * self.shard_size, self.count))
            for shard in range(self.manifest["done_shards"], self.manifest["shards"])
        ]

    def commit(self, shard: int) -> None:
        """Make the shard's rows durable, then record it as finished."""
        self.matrix.flush()
        release_pages(self.matrix)
        with atomic_file(self.directory / COLUMNS_FILE, "wb") as out:
            np.savez(out, **self.columns)
        self.manifest["done_shards"] = shard + 1
        write_json_atomic(self.directory / MANIFEST_FILE, self.manifest)


def _finished_manifest(directory: Path) -> dict[str, Any]:
    manifest_file = directory / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ForgetlessError(f"{directory}: no {MANIFEST_FILE}; nothing was computed here")
    manifest = json.loads(manifest_file.read_text())
    if manifest["done_shards"] < manifest["shards"]:
        raise ForgetlessError(f"{directory}: the computation is incomplete; rerun to resume")
    return manifest


def load_sharded_matrix(directory: str | Path) -> np.ndarray:
    """The matrix of a finished folder, memory-mapped (its ids are not read)."""
    _finished_manifest(Path(directory))
    return np.load(Path(directory) / MATRIX_FILE, mmap_mode="r")


def load_sharded_rows(directory: str | Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """``(ids, matrix, columns)`` of a finished folder; the matrix stays memory-mapped. Rows
    identified by number get their numbers as ids."""
    directory = Path(directory)
    manifest = _finished_manifest(directory)
    # Folders written before ids.json kept the ids in the manifest.
    ids = manifest["ids"] if isinstance(manifest["ids"], list) else None
    if ids is None:
        ids = json.loads((directory / IDS_FILE).read_text())
    if ids is None:
        ids = [str(row) for row in range(manifest["count"])]
    columns = dict(np.load(directory / COLUMNS_FILE).items()) if ids else {}
    return ids, np.load(directory / MATRIX_FILE, mmap_mode="r"), columns
