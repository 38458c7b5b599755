"""Data: built-in data sets, user files and Hub data sets, normalised into the record kinds.

:func:`load_records` is the single entry point the rest of forgetless uses: a registered data
set name goes to :func:`load_dataset`, an existing path to :func:`load_user_data`, an
``owner/name`` that is neither to :func:`load_hub_data`, and any other path-like source to
:func:`load_user_data` (which says the file is missing).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Importing these fills the registry; they must come after registry (which they import).
from forgetless.data import builtin as _builtin  # noqa: F401
from forgetless.data import corpora as _corpora  # noqa: F401
from forgetless.data import pools as _pools  # noqa: F401
from forgetless.data.config import DataConfig
from forgetless.data.records import (
    KINDS,
    RECORD_TYPES,
    ChatRecord,
    InstructionRecord,
    Message,
    MultipleChoiceRecord,
    Record,
    TextRecord,
)
from forgetless.data.registry import (
    DATASETS,
    DatasetSpec,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    resolve_data_file,
    split_sizes,
)
from forgetless.data.user import FILE_EXTENSIONS, is_hub_id, load_hub_data, load_user_data
from forgetless.errors import ForgetlessError

__all__ = [
    "DATASETS",
    "FILE_EXTENSIONS",
    "KINDS",
    "RECORD_TYPES",
    "ChatRecord",
    "DatasetSpec",
    "InstructionRecord",
    "Message",
    "MultipleChoiceRecord",
    "Record",
    "TextRecord",
    "get_dataset_spec",
    "is_hub_id",
    "list_datasets",
    "load_dataset",
    "load_hub_data",
    "load_records",
    "load_section",
    "load_user_data",
    "resolve_data_file",
    "split_sizes",
]


def load_section(data: DataConfig, data_dir: str | Path | None = None) -> list[Record]:
    """The records a data section describes. The stages of a run (the arms of a comparison)
    read the same sections again and again: each is read once per process."""
    source = Path(data.source)
    stamp = source.stat().st_mtime_ns if source.exists() else None  # an edited file rereads
    return list(_load_section(data.model_dump_json(), str(data_dir) if data_dir else None, stamp))


@functools.lru_cache(maxsize=8)
def _load_section(data_json: str, data_dir: str | None, stamp) -> tuple[Record, ...]:
    data = DataConfig.model_validate_json(data_json)
    return tuple(
        load_records(
            data.source,
            kind=data.kind,
            split=data.split,
            subset=data.subset,
            data_dir=data_dir,
            columns=data.columns,
            limit=data.limit,
            revision=data.revision,
        )
    )


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith(FILE_EXTENSIONS) or "/" in source or os.sep in source


def load_records(
    source: str,
    kind: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    data_dir: str | Path | None = None,
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    revision: str | None = None,
) -> list[Record]:
    """Records from a registered data set name, a user file or saved data set, or a Hub id."""
    if source in DATASETS:
        if columns:
            raise ForgetlessError(f"columns apply to user files only, not to data set '{source}'")
        if revision is not None:
            raise ForgetlessError(f"revision applies to hub data sets only, not to '{source}'")
        return load_dataset(source, kind, split, subset, data_dir, limit)
    exists = Path(source).expanduser().exists()
    if not exists and is_hub_id(source):
        return load_hub_data(source, kind, columns, split, subset, revision, limit)
    if exists or _looks_like_path(source):
        if subset is not None:
            raise ForgetlessError(
                f"subsets apply to built-in and hub data sets only, not to {source}"
            )
        if revision is not None:
            raise ForgetlessError(f"revision applies to hub data sets only, not to {source}")
        return load_user_data(source, kind, columns, split, limit)
    known = ", ".join(list_datasets())
    raise ForgetlessError(
        f"unknown data set or missing file '{source}' (known data sets: {known}; "
        "hub data sets are written owner/name)"
    )
