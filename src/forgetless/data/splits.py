"""Held-out splits for sources that ship none, and passages for long documents.

A record's split is a pure function of its data set's name and a group key (a document id,
a table, a passage), never of the other records: adding, removing or reordering records
upstream moves nothing else between splits, and records that share a key (the questions on
one table, the answers about one disease) always land in the same split, so evaluation on
``test`` never sees text it was trained on under another question.
"""

from __future__ import annotations

import hashlib
import re

HASH_SPLITS = ("train", "validation", "test")
VALIDATION_SHARE = 0.05
TEST_SHARE = 0.05


def hash_split(dataset: str, key: str, test_share: float = TEST_SHARE) -> str:
    """``train`` (90 %), ``validation`` (5 %) or ``test`` (5 %) for one group key; a data set
    meant for evaluation asks for a larger ``test_share``."""
    digest = hashlib.sha256(f"{dataset}\0{key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_share:
        return "test"
    if position < test_share + VALIDATION_SHARE:
        return "validation"
    return "train"


# The default embedder (all-MiniLM-L6-v2) reads 256 word pieces, about 1,000 characters of
# English; a longer document would be clustered and scored by its beginning alone.
PASSAGE_CHARS = 1000
MIN_PASSAGE_CHARS = 100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passages(paragraphs: list[str], limit: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive paragraphs packed into passages of at most ``limit`` characters.

    A paragraph longer than ``limit`` is cut at sentence ends (a single sentence longer than
    the limit stays whole); a last passage under ``MIN_PASSAGE_CHARS`` joins the one before.
    """
    pieces: list[str] = []
    for paragraph in paragraphs:
        if len(paragraph) <= limit:
            pieces.append(paragraph)
        else:
            pieces.extend(_pack(_SENTENCE_END.split(paragraph), limit, " "))
    packed = _pack(pieces, limit, "\n")
    if len(packed) > 1 and len(packed[-1]) < MIN_PASSAGE_CHARS:
        packed[-2:] = [packed[-2] + "\n" + packed[-1]]
    return packed


def _pack(pieces: list[str], limit: int, joiner: str) -> list[str]:
    packed: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(joiner) + len(piece) > limit:
            packed.append(current)
            current = piece
        else:
            current = f"{current}{joiner}{piece}" if current else piece
    if current:
        packed.append(current)
    return packed
