"""The pool of documents to cluster and mix: several sources read as text."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from forgetless.config import ForgetlessConfig
from forgetless.errors import ForgetlessError

logger = logging.getLogger(__name__)


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    sources: list[str]  # the source spec each document came from

    def __len__(self) -> int:
        return len(self.ids)


def load_corpus(config: ForgetlessConfig) -> Corpus:
    """Every source of ``config.mix.sources`` as text; empty documents are dropped."""
    from forgetless.data import load_records

    mix = config.mix
    if len(set(mix.sources)) != len(mix.sources):
        raise ForgetlessError("mix.sources lists a source twice")
    ids: list[str] = []
    texts: list[str] = []
    sources: list[str] = []
    empty = 0
    for spec in mix.sources:
        name, _, split = spec.partition("@")
        records = load_records(
            name,
            kind="text",
            split=split or None,
            data_dir=config.data_dir,
            limit=mix.limit_per_source,
        )
        for index, record in enumerate(records):
            if not record.text.strip():
                empty += 1
                continue
            ids.append(f"{spec}#{record.id or index}")
            texts.append(record.text)
            sources.append(spec)
    if empty:
        logger.warning("dropped %d empty documents", empty)
    if not ids:
        raise ForgetlessError("the mix sources hold no text")
    return Corpus(ids, texts, sources)
