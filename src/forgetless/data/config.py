"""Where training records come from and how they are read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgetless.schema import Section


class DataConfig(Section):
    source: str = Field(
        "pubmedqa",
        description="Registered data set name (see `forgetless data list`) or a path to "
        "jsonl/json/csv/tsv/parquet or a saved Hugging Face dataset.",
    )
    kind: Literal["text", "instruction", "multiple_choice"] | None = Field(
        None,
        description="How to read the records: text (language modelling), instruction "
        "(chat-template SFT, loss on responses) or multiple_choice. Default: the data set's "
        "native kind, or text for user files.",
    )
    split: str | None = Field(None, description="Split to read; default: the data set's default.")
    subset: str | None = Field(None, description="Subset (e.g. a seed split of the CL benchmark).")
    columns: dict[str, str] | None = Field(
        None, description="User files: record field -> column name, e.g. {text: abstract}."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")
