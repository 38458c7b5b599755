"""Reading data files row by row, every mistake located as ``file:line`` or ``file row N``.

Shared by the user-file loader and the built-in parsers: a malformed file, whether the user's
or a built-in one edited by hand, fails with one line that says where, never a traceback.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from forgetless.errors import ForgetlessError

Row = tuple[str, dict]  # (where it came from, column -> value)


def _decode(raw: bytes, where: str, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise ForgetlessError(f"{where}: not valid UTF-8 (byte {err.start} of the line)") from None


def jsonl_rows(path: Path) -> Iterator[Row]:
    # Binary lines split on b"\n" only, so line numbers match what editors show even when a
    # string holds U+2028 or a stray carriage return.
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ForgetlessError(
                    f"{where}: invalid JSON: {err.msg} (column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ForgetlessError(f"{where}: expected a JSON object, got {json_type(row)}")
            yield where, row


def plain_text_rows(path: Path) -> Iterator[Row]:
    """``{"text": document}`` per run of non-blank lines, located at its first line."""
    with path.open("rb") as handle:
        lines = [
            _decode(raw, f"{path}:{lineno}").rstrip("\r\n")
            for lineno, raw in enumerate(handle, start=1)
        ]
    start = None
    for lineno, line in enumerate([*lines, ""], start=1):
        if line.strip() and start is None:
            start = lineno
        elif not line.strip() and start is not None:
            text = "\n".join(lines[start - 1 : lineno - 1])
            yield f"{path}:{start}", {"text": text.removeprefix("\ufeff")}
            start = None


def json_document(path: Path):
    """A whole JSON file, syntax errors located by line."""
    text = _decode(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ForgetlessError(
            f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        ) from None


def json_rows(path: Path) -> Iterator[Row]:
    rows = json_document(path)
    if not isinstance(rows, list):
        raise ForgetlessError(f"{path}: expected a JSON array of objects, got {json_type(rows)}")
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        if not isinstance(row, dict):
            raise ForgetlessError(f"{where}: expected a JSON object, got {json_type(row)}")
        yield where, row


def json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def delimited_rows(path: Path, delimiter: str, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Rows of a csv/tsv file with a header; ``utf-8-sig`` drops a spreadsheet's byte-order mark."""
    with path.open(encoding=encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise ForgetlessError(f"{path}: empty file; expected a header row")
            while True:
                start = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    return
                if not fields:
                    continue
                where = f"{path}:{start}"
                if len(fields) != len(header):
                    raise ForgetlessError(
                        f"{where}: {len(fields)} fields but the header has {len(header)}"
                    )
                yield where, dict(zip(header, fields, strict=True))
        except csv.Error as err:
            raise ForgetlessError(f"{path}:{reader.line_num}: malformed row: {err}") from None
        except UnicodeDecodeError:
            raise ForgetlessError(f"{path}:{reader.line_num + 1}: not valid UTF-8") from None


def required(row: dict, key: str, where: str, kind: type | tuple[type, ...] = str):
    """``row[key]``, which must exist and be of ``kind``; otherwise a located error."""
    if key not in row:
        raise ForgetlessError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _types(kind):
        expected = " or ".join(t.__name__ for t in _types(kind))
        raise ForgetlessError(f"{where}: field '{key}' must be {expected}, got {json_type(value)}")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def xml_root(path: Path) -> ET.Element:
    """The root element of an XML file; a syntax error names its line."""
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        message = str(err).split(":")[0]
        raise ForgetlessError(
            f"{path}:{line}: malformed XML: {message} (column {column})"
        ) from None


_ATTRIBUTE = re.compile(r'([A-Za-z_][\w.-]*)="([^"]*)"')


def tagged_blocks(path: Path, tag: str, encoding: str = "utf-8") -> Iterator[tuple[str, dict, str]]:
    """``(where, attributes, inner text)`` of every ``<tag …>…</tag>`` block in a flat file.

    For SGML (Reuters-21578) and WikiExtractor output: neither is well-formed XML (undeclared
    entities, raw ``&`` and ``<`` in text, a DOCTYPE without its DTD), no parser among our
    dependencies reads them, and both only ever hold one level of these blocks. A block that
    opens inside another, or never closes, is an error at the line where it opened.
    """
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ForgetlessError(f"{path}:{line}: not valid {encoding}") from None
    opening = re.compile(rf"<{tag}(\s[^>]*)?>")
    closing = f"</{tag}>"
    position, line = 0, 1
    while True:
        match = opening.search(text, position)
        start = len(text) if match is None else match.start()
        stray = text.find(closing, position, start)
        if stray != -1:
            line += text.count("\n", position, stray)
            raise ForgetlessError(f"{path}:{line}: {closing} without an opening <{tag}>")
        if match is None:
            return
        line += text.count("\n", position, start)
        end = text.find(closing, match.end())
        nested = opening.search(text, match.end(), len(text) if end == -1 else end)
        if end == -1 or nested is not None:
            raise ForgetlessError(f"{path}:{line}: <{tag}> opened here is never closed")
        attributes = dict(_ATTRIBUTE.findall(match.group(1) or ""))
        yield f"{path}:{line}", attributes, text[match.end() : end]
        line += text.count("\n", start, end)
        position = end + len(closing)
