"""Loading the user's own data into records.

Accepted: ``.jsonl`` (one object per line), ``.json`` (an array of objects), ``.csv``, ``.tsv``,
``.parquet``, ``.txt`` (plain text: documents separated by blank lines, read as ``text``) and a
directory written by ``datasets``' ``save_to_disk``. Every mistake is a
:class:`ForgetlessError` that names the place: ``file:line`` (1-based) for jsonl/csv/tsv and
json syntax errors, ``file row N`` (0-based, as in ``dataset[N]``) for json arrays, parquet and
saved data sets. Loading is all or nothing: a bad row fails the whole file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from forgetless.data.readers import Row, delimited_rows, json_rows, jsonl_rows, plain_text_rows
from forgetless.data.records import (
    KINDS,
    InstructionRecord,
    MultipleChoiceRecord,
    Record,
    TextRecord,
)
from forgetless.errors import ForgetlessError

FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("prompt", "response", "system"),
    "multiple_choice": ("query", "choices", "gold"),
}
# Used when their column is there; a mapping the user gives for them makes them required.
OPTIONAL_FIELDS = ("system", "id")
MAX_LISTED_COLUMNS = 20


def load_user_data(
    path: str | Path,
    kind: str,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records of ``kind`` from a user file; ``columns`` maps record field -> source column.

    ``split`` chooses the split of a saved ``DatasetDict`` (default ``train``); plain files
    have no splits and ignore it.
    """
    if kind not in KINDS:
        raise ForgetlessError(f"unknown record kind '{kind}'; choose one of: {', '.join(KINDS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ForgetlessError(f"limit must be a non-negative integer, got {limit!r}")
    mapping = _column_mapping(kind, columns or {})
    explicit = set(columns or {})
    path = Path(path).expanduser()
    records: list[Record] = []
    for where, row in _rows(path, split):
        if limit is not None and len(records) >= limit:
            break
        record = _to_record(kind, row, mapping, explicit, where)
        if not record.id:
            record = dataclasses.replace(record, id=f"{path.name}/{len(records)}")
        records.append(record)
    if not records and limit != 0:
        raise ForgetlessError(f"{path}: no records found")
    return records


def _column_mapping(kind: str, columns: dict[str, str]) -> dict[str, str]:
    allowed = FIELDS[kind] + ("id",)
    for field, column in columns.items():
        if field not in allowed:
            raise ForgetlessError(
                f"columns: '{field}' is not a field of kind '{kind}'; fields: {', '.join(allowed)}"
            )
        if not isinstance(column, str) or not column:
            raise ForgetlessError(f"columns: the column for '{field}' must be a non-empty name")
    return {field: columns.get(field, field) for field in allowed}


# --- reading rows ----------------------------------------------------------------------------


def _rows(path: Path, split: str | None) -> Iterator[Row]:
    if not path.exists():
        raise ForgetlessError(f"data file not found: {path}")
    if path.is_dir():
        return _saved_dataset_rows(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_rows(path)
    if suffix == ".json":
        return json_rows(path)
    if suffix in (".csv", ".tsv"):
        return delimited_rows(path, "," if suffix == ".csv" else "\t")
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".txt":
        return plain_text_rows(path)
    raise ForgetlessError(
        f"{path}: unsupported file type '{suffix or path.name}'; use "
        f"{', '.join(FILE_EXTENSIONS)} or a directory written by datasets' save_to_disk"
    )


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise ForgetlessError(f"{path}: cannot read parquet: {_one_line(err)}") from None
    index = 0
    for batch in table.to_batches():
        for row in batch.to_pylist():
            yield f"{path} row {index}", row
            index += 1


def _saved_dataset_rows(path: Path, split: str | None) -> Iterator[Row]:
    import datasets  # heavy; only needed for this one format

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ForgetlessError(
            f"{path}: a directory, but not one written by save_to_disk ({_one_line(err)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ForgetlessError(
                f"{path}: no split '{name}'; available: {', '.join(loaded.keys())}"
            )
        loaded = loaded[name]
    for index, row in enumerate(loaded):
        yield f"{path} row {index}", row


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- rows to records -------------------------------------------------------------------------


def _to_record(
    kind: str, row: dict, mapping: dict[str, str], explicit: set[str], where: str
) -> Record:
    def value(field: str):
        column = mapping[field]
        if column in row:
            return row[column]
        if field in OPTIONAL_FIELDS and field not in explicit:
            return None
        available = [str(name) for name in row]
        listed = ", ".join(available[:MAX_LISTED_COLUMNS])
        if len(available) > MAX_LISTED_COLUMNS:
            listed += f", ... ({len(available)} in all)"
        mapped = "" if column == field else f" (for field '{field}')"
        raise ForgetlessError(f"{where}: missing column '{column}'{mapped}; available: {listed}")

    def text(field: str) -> str:
        return _nonempty_string(value(field), _name(field, mapping), where)

    row_id = value("id")
    row_id = "" if row_id is None else str(row_id)
    if kind == "text":
        return TextRecord(text=text("text"), id=row_id)
    if kind == "instruction":
        system = value("system")
        if system is not None and not isinstance(system, str):
            raise ForgetlessError(
                f"{where}: {_name('system', mapping)} must be a string, got {type(system).__name__}"
            )
        return InstructionRecord(
            prompt=text("prompt"), response=text("response"), system=system or None, id=row_id
        )
    query = text("query")
    choices = _choices(value("choices"), _name("choices", mapping), where)
    gold = _gold(value("gold"), choices, _name("gold", mapping), where)
    return MultipleChoiceRecord(query=query, choices=choices, gold=gold, id=row_id)


def _name(field: str, mapping: dict[str, str]) -> str:
    column = mapping[field]
    return f"column '{column}'" if column == field else f"column '{column}' (for '{field}')"


def _nonempty_string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise ForgetlessError(f"{where}: {name} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise ForgetlessError(f"{where}: {name} is empty")
    return value


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _choices(value: object, name: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        # csv/tsv cells cannot hold lists, so there the choices come as a JSON-encoded list.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ForgetlessError(
                f"{where}: {name} must be a list or a JSON-encoded list, got {value[:40]!r}"
            ) from None
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ForgetlessError(f"{where}: {name} must be a list, got {_type_name(value)}")
    if len(value) < 2:
        raise ForgetlessError(f"{where}: {name} needs at least 2 choices, got {len(value)}")
    for position, choice in enumerate(value):
        if not isinstance(choice, str) or not choice.strip():
            raise ForgetlessError(
                f"{where}: {name}: choice {position} must be a non-empty string, got {choice!r}"
            )
    return tuple(value)


def _gold(value: object, choices: Sequence[str], name: str, where: str) -> int:
    """An int index, a choice's own text, a letter A-Z, or (in csv) an index written as text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet written by pandas turns int columns with nulls into floats
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        stripped = value.strip()
        if value in choices or stripped in choices:
            # A choice's own text wins, so labels such as "1" or "B" mean themselves.
            return choices.index(value if value in choices else stripped)
        if len(stripped) == 1 and "A" <= stripped <= "Z":
            index = ord(stripped) - ord("A")
        elif stripped.lstrip("-").isdigit():
            index = int(stripped)
        else:
            raise ForgetlessError(
                f"{where}: {name} {value!r} is not an index, a letter A-Z or one of the choices"
            )
    else:
        raise ForgetlessError(
            f"{where}: {name} must be an int, a letter or a choice, got {_type_name(value)}"
        )
    if not 0 <= index < len(choices):
        raise ForgetlessError(
            f"{where}: {name} {value!r} is out of range for {len(choices)} choices"
        )
    return index
