"""The pool of documents to cluster and mix: several sources read as text."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

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
