"""Row-aligned arrays computed shard by shard and resumable: per-sample gradient features,
document embeddings.

A folder holds ``matrix.npy`` (memory-mapped, one row per sample), ``columns.npz`` (small
per-sample columns) and ``manifest.json`` (sample ids, what produced the rows, finished
shards). A rerun with the same identity continues at the first unfinished shard; a different
identity starts over.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_file, write_json_atomic

MATRIX_FILE = "matrix.npy"
COLUMNS_FILE = "columns.npz"
MANIFEST_FILE = "manifest.json"


class ShardedRows:
    def __init__(
        self,
        directory: str | Path,
        ids: Sequence[str],
        identity: dict[str, Any],
        shard_size: int,
        width: int,
        dtype: np.dtype | type,
        columns: dict[str, np.dtype | type],
    ):
        if len(set(ids)) != len(ids):
            raise ForgetlessError("sample ids must be unique")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.count = len(ids)
        shards = (len(ids) + shard_size - 1) // shard_size
        expected = {"ids": list(ids), "identity": identity, "shards": shards}
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
            shape=(len(ids), width),
        )
        columns_file = self.directory / COLUMNS_FILE
        if not fresh and columns_file.is_file():
            self.columns = {key: value.copy() for key, value in np.load(columns_file).items()}
        else:
            self.columns = {name: np.zeros(len(ids), kind) for name, kind in columns.items()}
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
        with atomic_file(self.directory / COLUMNS_FILE, "wb") as out:
            np.savez(out, **self.columns)
        self.manifest["done_shards"] = shard + 1
        write_json_atomic(self.directory / MANIFEST_FILE, self.manifest)


def load_sharded_rows(directory: str | Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """``(ids, matrix, columns)`` of a finished folder; the matrix stays memory-mapped."""
    directory = Path(directory)
    manifest_file = directory / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ForgetlessError(f"{directory}: no {MANIFEST_FILE}; nothing was computed here")
    manifest = json.loads(manifest_file.read_text())
    if manifest["done_shards"] < manifest["shards"]:
        raise ForgetlessError(f"{directory}: the computation is incomplete; rerun to resume")
    columns = dict(np.load(directory / COLUMNS_FILE).items()) if manifest["ids"] else {}
    return manifest["ids"], np.load(directory / MATRIX_FILE, mmap_mode="r"), columns
