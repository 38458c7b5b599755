"""One labelled example rendered as whichever of the three record kinds a caller asks for."""

from __future__ import annotations

from collections.abc import Sequence

from forgetless.data.records import InstructionRecord, MultipleChoiceRecord, Record, TextRecord

# Placed between a multiple-choice query and each choice (lm-eval's `target_delimiter`).
DELIMITER = " "
MC_KINDS = ("multiple_choice", "instruction", "text")


def choice_view(
    kind: str,
    query: str,
    choices: Sequence[str],
    gold: int,
    *,
    text: str | None = None,
    prompt: str | None = None,
    response: str | None = None,
    meta: dict | None = None,
) -> Record:
    """One multiple-choice example as the requested kind; overrides replace the generic views."""
    answer = choices[gold]
    if kind == "multiple_choice":
        return MultipleChoiceRecord(
            query=query, choices=tuple(choices), gold=gold, delimiter=DELIMITER, meta=meta or {}
        )
    if kind == "instruction":
        return InstructionRecord(
            prompt=query if prompt is None else prompt,
            response=answer if response is None else response,
        )
    return TextRecord(text=f"{query}{DELIMITER}{answer}" if text is None else text)


def pair_view(
    kind: str, prompt: str, response: str, *, text: str | None = None, system: str | None = None
) -> Record:
    """A prompt and its response as an instruction, or as one text (prompt, newline, response)."""
    if kind == "instruction":
        return InstructionRecord(prompt=prompt, response=response, system=system)
    return TextRecord(text=f"{prompt}\n{response}" if text is None else text)
