"""Loading the user's own data into records: files, saved data sets and Hub data sets.

Accepted: ``.jsonl`` (one object per line), ``.json`` (an array of objects), ``.csv``, ``.tsv``,
``.parquet``, ``.txt`` (plain text: documents separated by blank lines, read as ``text``), a
directory written by ``datasets``' ``save_to_disk``, and a Hugging Face Hub data set id
``owner/name`` (read through ``datasets``, which caches it). Every mistake is a
:class:`ForgetlessError` that names the place: ``file:line`` (1-based) for jsonl/csv/tsv and
json syntax errors, ``file row N`` (0-based, as in ``dataset[N]``) for json arrays, parquet and
saved data sets, ``owner/name[split] row N`` for the hub. Loading is all or nothing: a bad row
fails the whole source.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from forgetless.data.readers import Row, delimited_rows, json_rows, jsonl_rows, plain_text_rows
from forgetless.data.records import (
    KINDS,
    ChatRecord,
    InstructionRecord,
    Message,
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
    "chat": ("messages",),
}
# Used when their column is there; a mapping the user gives for them makes them required.
OPTIONAL_FIELDS = ("system", "id")
# Columns read for an unmapped field when its own name is absent: ShareGPT-style data keeps
# its turns in `conversations`.
FALLBACK_COLUMNS: dict[str, tuple[str, ...]] = {"messages": ("conversations",)}
# ShareGPT speaker names ({"from": ..., "value": ...} messages) and the roles they stand for.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
MAX_LISTED_COLUMNS = 20
# `owner/name` as the Hub spells repository ids; anything else (a leading `.`, `/` or `~`, more
# than one slash) is a path.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
# A name ending like a file (`.jsonl`, `.xml`, `.gz`) is a mistyped path, never a hub id.
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]{1,8}$")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub data set id: ``owner/name`` without a file suffix.

    The caller first rules out registered names and existing local paths.
    """
    return HUB_ID.fullmatch(source) is not None and not _FILE_SUFFIX.search(source)


def load_user_data(
    path: str | Path,
    kind: str | None = None,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records of ``kind`` from a user file; ``columns`` maps record field -> source column.

    Without a ``kind``, data with a ``messages`` (or ``conversations``) column, or a mapping for
    ``messages``, reads as ``chat`` and anything else as ``text``. ``split`` chooses the split of
    a saved ``DatasetDict`` (default ``train``); plain files have no splits and ignore it.
    """
    _check_options(kind, columns, limit)
    path = Path(path).expanduser()
    return _records(_rows(path, split), kind, columns or {}, limit, path.name, str(path))


def load_hub_data(
    repo_id: str,
    kind: str | None = None,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records of a Hugging Face Hub data set, read like a user file (same columns and kinds).

    ``subset`` is the data set's configuration, ``split`` defaults to ``train`` and
    ``revision`` to the main branch. The data come from the local ``datasets`` cache when it
    holds them, and are downloaded into it otherwise (unless offline mode is on).
    """
    _check_options(kind, columns, limit)
    split = split or "train"
    dataset = _hub_split(repo_id, subset, split, revision)
    label = f"{repo_id}{f':{subset}' if subset else ''}[{split}]"
    rows = ((f"{label} row {index}", row) for index, row in enumerate(dataset))
    prefix = "/".join(part for part in (repo_id, subset, split) if part)
    return _records(rows, kind, columns or {}, limit, prefix, label)


def _check_options(kind: str | None, columns: dict[str, str] | None, limit: int | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ForgetlessError(f"unknown record kind '{kind}'; choose one of: {', '.join(KINDS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ForgetlessError(f"limit must be a non-negative integer, got {limit!r}")
    if kind is not None:
        _column_mapping(kind, columns or {})  # a bad mapping fails before any data is read


def _records(
    rows: Iterable[Row],
    kind: str | None,
    columns: dict[str, str],
    limit: int | None,
    id_prefix: str,
    source: str,
) -> list[Record]:
    explicit = set(columns)
    mapping = None if kind is None else _column_mapping(kind, columns)
    records: list[Record] = []
    for where, row in rows:
        if limit is not None and len(records) >= limit:
            break
        if mapping is None:
            kind = _detected_kind(row, columns)
            mapping = _column_mapping(kind, columns)
        record = _to_record(kind, row, mapping, explicit, where)
        if not record.id:
            record = dataclasses.replace(record, id=f"{id_prefix}/{len(records)}")
        records.append(record)
    if not records and limit != 0:
        raise ForgetlessError(f"{source}: no records found")
    return records


def _detected_kind(row: dict, columns: dict[str, str]) -> str:
    chat_columns = ("messages", *FALLBACK_COLUMNS["messages"])
    if "messages" in columns or any(column in row for column in chat_columns):
        return "chat"
    return "text"


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


# --- the hub ---------------------------------------------------------------------------------


def _hub_split(repo_id: str, subset: str | None, split: str, revision: str | None):
    import datasets  # heavy; only needed for hub data
    from datasets.exceptions import DatasetsError
    from huggingface_hub.utils import httpx  # the HTTP client whose errors the hub raises

    offline = datasets.config.HF_HUB_OFFLINE
    cache = datasets.config.HF_DATASETS_CACHE
    try:
        builder = datasets.load_dataset_builder(repo_id, name=subset, revision=revision)
    except (ConnectionError, httpx.TransportError) as err:
        if offline:
            raise ForgetlessError(
                f"hub data set '{repo_id}' is not in the local datasets cache ({cache}, set by "
                "$HF_DATASETS_CACHE) and offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
                "load it once online, or check the id (no local file or folder has that name)"
            ) from None
        raise ForgetlessError(
            f"cannot reach the Hugging Face Hub for data set '{repo_id}' and it is not in the "
            f"local datasets cache ({cache}): {_one_line(err)}"
        ) from None
    except (OSError, ValueError, RuntimeError, DatasetsError, httpx.HTTPError) as err:
        raise ForgetlessError(f"hub data set '{repo_id}': {_one_line(err)}") from None
    # Offline, datasets falls back to the newest cached copy whatever the revision asked for.
    if offline and revision is not None and builder.hash != revision:
        raise ForgetlessError(
            f"hub data set '{repo_id}': revision '{revision}' is not the cached copy (commit "
            f"{builder.hash}) and offline mode is on; give the cached commit or go online"
        )
    try:
        builder.download_and_prepare()
        return builder.as_dataset(split=split)
    except (OSError, ValueError, RuntimeError, DatasetsError, httpx.HTTPError) as err:
        raise ForgetlessError(f"hub data set '{repo_id}': {_one_line(err)}") from None


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
    def column_of(field: str) -> str:
        column = mapping[field]
        if column not in row and field not in explicit:
            column = next(
                (other for other in FALLBACK_COLUMNS.get(field, ()) if other in row), column
            )
        return column

    def name(field: str) -> str:
        column = column_of(field)
        return f"column '{column}'" if column == field else f"column '{column}' (for '{field}')"

    def value(field: str):
        column = column_of(field)
        if column in row:
            return row[column]
        if field in OPTIONAL_FIELDS and field not in explicit:
            return None
        available = [str(key) for key in row]
        listed = ", ".join(available[:MAX_LISTED_COLUMNS])
        if len(available) > MAX_LISTED_COLUMNS:
            listed += f", ... ({len(available)} in all)"
        mapped = "" if column == field else f" (for field '{field}')"
        raise ForgetlessError(f"{where}: missing column '{column}'{mapped}; available: {listed}")

    def text(field: str) -> str:
        return _nonempty_string(value(field), name(field), where)

    row_id = value("id")
    row_id = "" if row_id is None else str(row_id)
    if kind == "text":
        return TextRecord(text=text("text"), id=row_id)
    if kind == "instruction":
        system = value("system")
        if system is not None and not isinstance(system, str):
            raise ForgetlessError(
                f"{where}: {name('system')} must be a string, got {type(system).__name__}"
            )
        return InstructionRecord(
            prompt=text("prompt"), response=text("response"), system=system or None, id=row_id
        )
    if kind == "chat":
        messages = _messages(value("messages"), name("messages"), where)
        try:
            return ChatRecord(messages=messages, id=row_id)
        except ValueError as err:
            raise ForgetlessError(f"{where}: {name('messages')}: {err}") from None
    query = text("query")
    choices = _choices(value("choices"), name("choices"), where)
    gold = _gold(value("gold"), choices, name("gold"), where)
    return MultipleChoiceRecord(query=query, choices=choices, gold=gold, id=row_id)


def _messages(value: object, name: str, where: str) -> tuple[Message, ...]:
    """Messages as ``{role, content}`` objects, or ShareGPT's ``{from, value}`` with the speaker
    names of :data:`SHAREGPT_ROLES`; a JSON-encoded list in csv/tsv cells."""
    value = _decoded_list(value, name, where)
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ForgetlessError(
                f"{where}: {name}: message {position} must be an object with role and content, "
                f"got {_type_name(message)}"
            )
        # Arrow gives every message of a column the union of all keys, absent ones as null.
        if message.get("role") is None and message.get("from") is not None:
            speaker = message["from"]
            role = SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker
            messages.append(Message(role, message.get("value")))
        elif "role" in message or "content" in message:
            messages.append(Message(message.get("role"), message.get("content")))
        else:
            keys = ", ".join(str(key) for key in message) or "none"
            raise ForgetlessError(
                f"{where}: {name}: message {position} needs role and content (or ShareGPT's "
                f"from and value); keys: {keys}"
            )
    return tuple(messages)


def _decoded_list(value: object, name: str, where: str) -> Sequence:
    if isinstance(value, str):
        # csv/tsv cells cannot hold lists, so there lists come JSON-encoded.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ForgetlessError(
                f"{where}: {name} must be a list or a JSON-encoded list, got {value[:40]!r}"
            ) from None
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ForgetlessError(f"{where}: {name} must be a list, got {_type_name(value)}")
    return value


def _nonempty_string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise ForgetlessError(f"{where}: {name} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise ForgetlessError(f"{where}: {name} is empty")
    return value


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _choices(value: object, name: str, where: str) -> tuple[str, ...]:
    value = _decoded_list(value, name, where)
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
