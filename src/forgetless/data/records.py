"""The three kinds every data source normalises into.

* :class:`TextRecord` — raw text for language modelling and perplexity.
* :class:`InstructionRecord` — a prompt and a response, trained through the tokenizer's chat
  template with the loss on the response tokens only.
* :class:`MultipleChoiceRecord` — a query, its choices and the gold index, scored by the
  log-likelihood of each choice as a continuation of the query.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Kind = Literal["text", "instruction", "multiple_choice"]
KINDS: tuple[str, ...] = ("text", "instruction", "multiple_choice")


@dataclass(frozen=True)
class TextRecord:
    text: str
    id: str = ""


@dataclass(frozen=True)
class InstructionRecord:
    prompt: str
    response: str
    system: str | None = None
    id: str = ""


@dataclass(frozen=True)
class MultipleChoiceRecord:
    query: str
    choices: tuple[str, ...]
    gold: int
    id: str = ""
    # Placed between the query and each choice when scoring (lm-eval's `target_delimiter`).
    delimiter: str = " "
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} out of range for {len(self.choices)} choices")


Record = TextRecord | InstructionRecord | MultipleChoiceRecord

RECORD_TYPES: dict[str, type] = {
    "text": TextRecord,
    "instruction": InstructionRecord,
    "multiple_choice": MultipleChoiceRecord,
}


def record_row(record: Record) -> dict:
    """A record as a JSON-able row of its own fields (what ``record_from_row`` reads back)."""
    row = asdict(record)
    row.pop("meta", None)
    return row


def record_from_row(row: dict) -> Record:
    """The record a ``record_row`` row holds; the fields present say its kind."""
    if "query" in row:
        return MultipleChoiceRecord(
            query=row["query"],
            choices=tuple(row["choices"]),
            gold=row["gold"],
            id=row.get("id", ""),
            delimiter=row.get("delimiter", " "),
        )
    if "prompt" in row:
        return InstructionRecord(
            prompt=row["prompt"],
            response=row["response"],
            system=row.get("system"),
            id=row.get("id", ""),
        )
    return TextRecord(text=row["text"], id=row.get("id", ""))


def read_records(path) -> list[Record]:
    """Records written one ``record_row`` per line (extra keys, such as a rank, ignored)."""
    import json

    with open(path, encoding="utf-8") as handle:
        return [record_from_row(json.loads(line)) for line in handle if line.strip()]
