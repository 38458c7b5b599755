"""The four kinds every data source normalises into.

* :class:`TextRecord` — raw text for language modelling and perplexity.
* :class:`InstructionRecord` — a prompt and a response, trained through the tokenizer's chat
  template with the loss on the response tokens only.
* :class:`MultipleChoiceRecord` — a query, its choices and the gold index, scored by the
  log-likelihood of each choice as a continuation of the query.
* :class:`ChatRecord` — a multi-turn conversation (optional system prompt, user and assistant
  turns), trained through the chat template with the loss on every assistant turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

Kind = Literal["text", "instruction", "multiple_choice", "chat"]
KINDS: tuple[str, ...] = ("text", "instruction", "multiple_choice", "chat")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


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


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]
    id: str = ""

    def __post_init__(self) -> None:
        check_conversation(self.messages)


def check_conversation(messages: Sequence[Message]) -> None:
    """A ValueError naming the first thing that makes ``messages`` untrainable.

    Chat templates expect a system prompt only in front and a user turn before the first reply
    (some read ``messages[0]`` unguarded, others raise), and a conversation without an
    assistant turn has nothing to learn.
    """
    for position, message in enumerate(messages):
        if message.role not in ROLES:
            raise ValueError(
                f"message {position} has role {message.role!r}; roles: {', '.join(ROLES)}"
            )
        if not isinstance(message.content, str):
            raise ValueError(
                f"message {position} ({message.role}): content must be a string, "
                f"got {'null' if message.content is None else type(message.content).__name__}"
            )
        if not message.content.strip():
            raise ValueError(f"message {position} ({message.role}) is empty")
        if message.role == "system" and position > 0:
            raise ValueError(f"message {position}: a system prompt may only come first")
    opening = 1 if messages and messages[0].role == "system" else 0
    if len(messages) <= opening or messages[opening].role != "user":
        raise ValueError("the conversation must open with a user turn (after any system prompt)")
    if not any(message.role == "assistant" for message in messages):
        raise ValueError("the conversation has no assistant turn to learn from")


Record = TextRecord | InstructionRecord | MultipleChoiceRecord | ChatRecord

RECORD_TYPES: dict[str, type] = {
    "text": TextRecord,
    "instruction": InstructionRecord,
    "multiple_choice": MultipleChoiceRecord,
    "chat": ChatRecord,
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
    if "messages" in row:
        return ChatRecord(
            messages=tuple(Message(m["role"], m["content"]) for m in row["messages"]),
            id=row.get("id", ""),
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
