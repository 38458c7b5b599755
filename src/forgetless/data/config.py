"""Where training records come from and how they are read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgetless.schema import LOCAL_CONTENT, Section


class DataConfig(Section):
    source: str = Field(
        "pubmedqa",
        description="Registered data set name (see `forgetless data list`), a path to "
        "jsonl/json/csv/tsv/parquet or a saved Hugging Face dataset, or a Hugging Face Hub "
        "data set id `owner/name` (read through `datasets`, cached; see docs/data.md).",
        json_schema_extra=LOCAL_CONTENT,
    )
    kind: Literal["text", "instruction", "multiple_choice", "chat"] | None = Field(
        None,
        description="How to read the records: text (language modelling), instruction "
        "(chat-template SFT, loss on responses), multiple_choice, or chat (multi-turn "
        "`messages`, loss on every assistant turn). Default: the data set's native kind; for "
        "user files and hub data sets chat when there is a `messages` (or ShareGPT "
        "`conversations`) column or `columns` maps `messages`, otherwise text.",
    )
    split: str | None = Field(
        None, description="Split to read; default: the data set's default (train on the hub)."
    )
    subset: str | None = Field(
        None,
        description="Subset (e.g. a seed split of the CL benchmark); for a hub data set, its "
        "configuration name.",
    )
    revision: str | None = Field(
        None,
        description="Hub data sets only: the branch, tag or commit to read (default: main). "
        "Offline, only the full commit hash of the cached copy matches.",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="User files and hub data sets: record field -> column name, e.g. "
        "{text: abstract} or {messages: conversation}.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")
