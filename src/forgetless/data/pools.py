"""Pools: several corpora of one domain as one data set, for selection and mixture experiments.

``--data medical_pool`` (or ``mix.sources: [web_pool]``) is the whole medical corpus in one
name. A pool's split is the same split of each member, so a pool's ``validation`` and ``test``
never share a record (or a record's table, passage or document) with its ``train``.

Records come in one fixed shuffled order (seeded by the pool's name), so ``limit: N`` takes a
uniform sample rather than the first member; ids name the member record
(``medical_pool/train/medquad/17`` is ``medquad/train/17``). In the text view, documents
(statutes, news articles, encyclopedia articles) are cut into passages of at most
:data:`~forgetless.data.splits.PASSAGE_CHARS` characters at paragraph boundaries
(``reuters/17.2`` is the third passage of ``reuters/train/17``); question-answer text stays
whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from forgetless.data.records import Record, TextRecord
from forgetless.data.registry import DATASETS, FileLister, Parser, add_builtin
from forgetless.data.splits import HASH_SPLITS, passages


@dataclass(frozen=True)
class Member:
    name: str
    as_passages: bool = False  # documents, cut into passages in the text view


@dataclass(frozen=True)
class Pool:
    name: str
    summary: str
    members: tuple[Member, ...]
    kinds: tuple[str, ...]


POOLS = (
    Pool(
        "medical_pool",
        "Medical pool: MedQuAD, ChatDoctor and medical abstracts.",
        (Member("medquad"), Member("chatdoctor"), Member("medical_abstracts")),
        ("instruction", "text"),
    ),
    Pool(
        "financial_pool",
        "Financial pool: finance tweets, XBRL terms, finance formulas and TAT-QA.",
        (Member("fin_tweets"), Member("xbrl_terms"), Member("fin_formulas"), Member("tatqa")),
        ("instruction", "text"),
    ),
    Pool(
        "legal_pool",
        "Legal pool: US Code sections (as passages) and PolicyQA.",
        (Member("uscode", as_passages=True), Member("policyqa")),
        ("text",),
    ),
    Pool(
        "web_pool",
        "General web pool: Reuters-21578 news and Wikipedia articles, as passages.",
        (Member("reuters", as_passages=True), Member("wikipedia", as_passages=True)),
        ("text",),
    ),
    Pool(
        "replay_pool",
        "General instruction pool for replay: T0 tasks and the Alpaca sample.",
        (Member("t0_instruct"), Member("alpaca_sample")),
        ("instruction", "text"),
    ),
)


POOL_NAMES = frozenset(pool.name for pool in POOLS)


def pool_member(record_id: str) -> str | None:
    """The member a pool's record came from (``medical_pool/train/medquad/17`` is from
    ``medquad``), or None for a record of no pool."""
    parts = record_id.split("/")
    if len(parts) > 3 and parts[0] in POOL_NAMES:
        return parts[2]
    return None


def _files(pool: Pool) -> FileLister:
    def files(split: str, subset: str | None) -> tuple[str, ...]:
        listed = (rel for m in pool.members for rel in DATASETS[m.name].files(split, None))
        return tuple(dict.fromkeys(listed))

    return files


def _member_records(member: Member, records: Iterator[Record], kind: str) -> Iterator[Record]:
    for index, record in enumerate(records):
        if kind == "text" and member.as_passages:
            assert isinstance(record, TextRecord)
            for number, passage in enumerate(passages(record.text.split("\n"))):
                yield TextRecord(text=passage, id=f"{member.name}/{index}.{number}")
        else:
            yield dataclasses.replace(record, id=f"{member.name}/{index}")


def _parser(pool: Pool) -> Parser:
    list_files = _files(pool)

    def parse(paths: Sequence[Path], kind: str, split: str) -> list[Record]:
        resolved = dict(zip(list_files(split, None), paths, strict=True))
        records: list[Record] = []
        for member in pool.members:
            spec = DATASETS[member.name]
            member_paths = [resolved[relpath] for relpath in spec.files(split, None)]
            records.extend(_member_records(member, spec.parse(member_paths, kind, split), kind))
        seed = int.from_bytes(hashlib.sha256(pool.name.encode()).digest()[:8], "big")
        random.Random(seed).shuffle(records)
        return records

    return parse


def _register() -> None:
    for pool in POOLS:
        specs = [DATASETS[member.name] for member in pool.members]
        assert all(set(pool.kinds) <= set(spec.kinds) for spec in specs), pool.name
        assert all(spec.splits == HASH_SPLITS for spec in specs), pool.name
        terms = "; ".join(f"{spec.name}: {spec.terms}" for spec in specs if spec.terms)
        add_builtin(
            pool.name,
            pool.summary,
            pool.kinds,
            _files(pool),
            _parser(pool),
            splits=HASH_SPLITS,
            terms=terms,
        )


_register()
