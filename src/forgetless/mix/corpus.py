"""The pool of documents to cluster and mix: several sources read as text, or one file read
on demand (``TextFile``) for a pool too large to hold in memory."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forgetless.errors import ForgetlessError

logger = logging.getLogger(__name__)


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    sources: list[str]  # the source spec each document came from

    def __len__(self) -> int:
        return len(self.ids)


def load_corpus(
    sources: list[str] | tuple[str, ...], limit_per_source: int | None, data_dir: str | None
) -> Corpus:
    """Every source as text; empty documents are dropped. Each stage of a mixture reads the
    pool: it is read once per process."""
    return _load_corpus(tuple(sources), limit_per_source, data_dir)


@functools.lru_cache(maxsize=2)
def _load_corpus(sources: tuple[str, ...], limit_per_source, data_dir) -> Corpus:
    from forgetless.data import load_records

    if len(set(sources)) != len(sources):
        raise ForgetlessError("mix.sources lists a source twice")
    ids: list[str] = []
    texts: list[str] = []
    origins: list[str] = []
    empty = 0
    for spec in sources:
        name, _, split = spec.partition("@")
        records = load_records(
            name,
            kind="text",
            split=split or None,
            data_dir=data_dir,
            limit=limit_per_source,
        )
        for index, record in enumerate(records):
            if not record.text.strip():
                empty += 1
                continue
            ids.append(f"{spec}#{record.id or index}")
            texts.append(record.text)
            origins.append(spec)
    if empty:
        logger.warning("dropped %d empty documents", empty)
    if not ids:
        raise ForgetlessError("the mix sources hold no text")
    return Corpus(ids, texts, origins)


class TextFile(Sequence[str]):
    """The ``text`` field of each line of a jsonl file, read from disk when asked for: a pool
    the embedding and quality passes stream through. It holds one int64 offset per line (8
    bytes a document) and nothing of the texts; a slice reads only its lines. Picklable, so
    Ray workers open the same path (on a multi-node cluster, a path every node mounts)."""

    def __init__(self, path: str | Path, limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ForgetlessError(f"{self.path}: no such file")
        with self.path.open("rb") as handle:
            lengths = np.fromiter((len(line) for line in itertools.islice(handle, limit)), np.int64)
        # Start of every line, and the end of the last one.
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ForgetlessError("a TextFile is read in contiguous slices only")
            return self._read(start, max(start, stop))
        row = range(len(self))[index]
        return self._read(row, row + 1)[0]

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as handle:
            for line in itertools.islice(handle, len(self)):
                yield json.loads(line)["text"]

    def _read(self, start: int, stop: int) -> list[str]:
        with self.path.open("rb") as handle:
            handle.seek(int(self.offsets[start]))
            data = handle.read(int(self.offsets[stop] - self.offsets[start]))
        return [json.loads(line)["text"] for line in data.split(b"\n")[: stop - start]]
