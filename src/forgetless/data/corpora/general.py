"""General corpora: instruction data for replay (T0 tasks, an Alpaca sample) and web text for
clustering (Reuters-21578 newswire, Wikipedia)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from forgetless.data.corpora.files import files_under, same_files, tidy_lines
from forgetless.data.readers import json_rows, jsonl_rows, required, tagged_blocks
from forgetless.data.records import Record, TextRecord
from forgetless.data.registry import add_builtin
from forgetless.data.splits import HASH_SPLITS, hash_split
from forgetless.data.views import pair_view
from forgetless.errors import ForgetlessError

PAIR_KINDS = ("instruction", "text")
END_OF_TEXT = "<|endoftext|>"


def _parse_t0(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for path in paths:
        for where, row in jsonl_rows(path):
            prompt = required(row, "prompt", where)
            completion = required(row, "completion", where).removesuffix(END_OF_TEXT)
            # Seven TREC templates (1,400 rows) lost their labels upstream: nothing to learn.
            if not prompt.strip() or not completion.strip():
                continue
            if hash_split("t0_instruct", prompt) != split:
                continue
            # The templates were written to be read as one text: prompt then completion.
            yield pair_view(kind, prompt.strip(), completion.strip(), text=prompt + completion)


def _parse_alpaca(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for where, row in json_rows(paths[0]):
        instruction = required(row, "instruction", where).strip()
        extra, output = (
            required(row, "input", where).strip(),
            required(row, "output", where).strip(),
        )
        if not instruction or not output:
            raise ForgetlessError(f"{where}: empty instruction or output")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        if hash_split("alpaca_sample", prompt) != split:
            continue
        yield pair_view(kind, prompt, output)


_CONTROL_REFERENCE = re.compile(r"&#(?:[0-9]|[12][0-9]|3[01]|127);")
_SIGN_OFF = re.compile(r"\s*\bReuter\b\s*$", re.IGNORECASE)


def _sgml_text(raw: str) -> str:
    # The wire's control characters arrive as numeric references (&#2;, &#3;, ...).
    return html.unescape(_CONTROL_REFERENCE.sub("", raw))


def _newswire_paragraphs(body: str) -> list[str]:
    """Lines are wrapped at 70 columns; a paragraph (or a table row) starts indented."""
    body = _SIGN_OFF.sub("", _sgml_text(body))
    return [" ".join(part.split()) for part in re.split(r"\n(?=[ \t])", body) if part.strip()]


def _element(block: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", block, re.DOTALL)
    return None if match is None else match.group(1)


def _parse_reuters(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """Articles with a body: title, then the body's paragraphs."""
    for path in paths:
        for where, attributes, block in tagged_blocks(path, "REUTERS", encoding="latin-1"):
            if "NEWID" not in attributes:
                raise ForgetlessError(f"{where}: <REUTERS> without a NEWID attribute")
            body = _element(block, "BODY")
            if body is None or hash_split("reuters", attributes["NEWID"]) != split:
                continue
            paragraphs = _newswire_paragraphs(body)
            title = " ".join(_sgml_text(_element(block, "TITLE") or "").split())
            if paragraphs:
                yield TextRecord(text="\n".join([title, *paragraphs] if title else paragraphs))


# Shorter articles are stubs: a title, an infobox remnant, or a sentence.
WIKIPEDIA_MIN_CHARS = 200


def _parse_wikipedia(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """WikiExtractor articles with at least WIKIPEDIA_MIN_CHARS characters of text."""
    for path in paths:
        for where, attributes, block in tagged_blocks(path, "doc"):
            if "id" not in attributes:
                raise ForgetlessError(f"{where}: <doc> without an id attribute")
            title = attributes.get("title", "")
            lines = tidy_lines(block).split("\n")
            if lines and lines[0] == title:
                lines = lines[1:]
            body = "\n".join(lines)
            if (
                len(body) < WIKIPEDIA_MIN_CHARS
                or hash_split("wikipedia", attributes["id"]) != split
            ):
                continue
            yield TextRecord(text=f"{title}\n{body}" if title else body)


def register() -> None:
    add_builtin(
        "t0_instruct",
        "The T0 (P3) training mixture as prompt-completion pairs (Self-Instruct's "
        "t0_train_50k: 180 templates over 22 source data sets, none of them an evaluation "
        "here).",
        PAIR_KINDS,
        files_under("general/instruct/t0_train_50k", ".jsonl"),
        _parse_t0,
        splits=HASH_SPLITS,
        terms="source data sets keep their own licenses",
    )
    add_builtin(
        "alpaca_sample",
        "Alpaca-format English instructions with GPT-4-style answers (LLaMA-Factory's demo set).",
        PAIR_KINDS,
        same_files("general/instruct/alpaca_en_demo.json"),
        _parse_alpaca,
        splits=HASH_SPLITS,
        terms="non-commercial (CC-BY-NC)",
    )
    add_builtin(
        "reuters",
        "Reuters-21578 newswire from 1987: articles with a body, SGML parsed.",
        ("text",),
        files_under("general/reuters21578", ".sgm"),
        _parse_reuters,
        splits=HASH_SPLITS,
        terms="research only (Reuters-21578 Distribution 1.0; acknowledge on publication)",
    )
    add_builtin(
        "wikipedia",
        f"English Wikipedia articles (WikiExtractor output); stubs under {WIKIPEDIA_MIN_CHARS} "
        "characters dropped.",
        ("text",),
        files_under("general/wikipedia", ""),
        _parse_wikipedia,
        splits=HASH_SPLITS,
        terms="share-alike (CC-BY-SA)",
    )
