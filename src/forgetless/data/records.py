"""The three kinds every data source normalises into.

* :class:`TextRecord` — raw text for language modelling and perplexity.
* :class:`InstructionRecord` — a prompt and a response, trained through the tokenizer's chat
  template with the loss on the response tokens only.
* :class:`MultipleChoiceRecord` — a query, its choices and the gold index, scored by the
  log-likelihood of each choice as a continuation of the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
