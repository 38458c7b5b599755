"""Model cards: the README.md in every model folder forgetless writes.

A card says what the model is, what it was made from (base model, data and their
fingerprints), how (method and settings), at what cost (compute), and what it retained (the
retention table once the model has been evaluated against its base). It is rendered from plain
data the caller hands over, so this module imports nothing of forgetless above ``errors`` and
``io``: the training and merging code that knows these facts depends on it, not the reverse.

Cards are deterministic (no timestamps, no temporary paths): a finished run rerun leaves every
byte in place. Only the compute section's measured wall time and memory differ between two
separate runs of the same settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from forgetless.io import write_text_atomic

CARD_FILE = "README.md"
RETENTION = "Retention"
LOADING = "How to load"
NOT_EVALUATED = (
    "Not evaluated in the run that made it. `forgetless run --config CONFIG.yaml` with these "
    "settings evaluates the base and the adapted model on the same items and writes the "
    "retention table here; `forgetless eval --model <this folder>` scores it alone."
)
LOCAL_PATH = "path/to/this/folder"


@dataclass(frozen=True)
class Provenance:
    """What a model was made from, as the caller named it: a loaded model has forgotten the
    alias or hub id it came from, and a list of records the data set it was read from."""

    base_model: str
    data: Mapping[str, Any] = field(default_factory=dict)  # source, split, kind, ...
    datasets: tuple[str, ...] = ()  # data set names, for the metadata when they are hub ids
    revision: str | None = None  # of a hub base model


@dataclass(frozen=True)
class CardContent:
    """Everything a card shows; empty parts are left out."""

    kind: str  # "fine-tune" or "merge"
    method: str
    method_summary: str  # one clause, from the method registry
    provenance: Provenance
    settings: Mapping[str, Any]
    compute: Mapping[str, Any] = field(default_factory=dict)
    experts: Sequence[Mapping[str, Any]] = ()  # merges: one row per expert
    diagnostics: Mapping[str, Any] = field(default_factory=dict)  # merges: overlap summary


def _hub_id(name: str) -> str | None:
    """``name`` when it can only be a Hub repository (owner/name), not an alias or a path."""
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(item) for item in value) or "–"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_cell(item)}" for key, item in value.items()) or "–"
    text = str(value)
    # Regexes and paths read verbatim in a code span; a pipe would still end the table cell.
    if "`" not in text and re.search(r"[\\*_<>\[\]|]", text):
        text = f"`{text}`"
    return text.replace("|", "\\|")


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {_cell(value)} |" for key, value in rows.items()]


def _loading(location: str) -> list[str]:
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{location}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        "```",
    ]


def render_card(content: CardContent) -> str:
    """The card as Markdown with YAML metadata; not yet evaluated, loaded from its folder."""
    base = content.provenance.base_model
    datasets = [name for name in content.provenance.datasets if _hub_id(name)]
    metadata = ModelCardData(
        base_model=_hub_id(base),
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["forgetless", content.method],
    )
    if content.kind == "merge":
        count = f"{len(content.experts)} expert" + ("s" if len(content.experts) > 1 else "")
        title = f"{base} · {content.method} merge of {count}"
        what = (
            f"{count} fine-tuned from `{base}`, merged back into it by forgetless with "
            f"`{content.method}`: {content.method_summary}."
        )
    else:
        title = f"{base} · {content.method} fine-tune"
        what = (
            f"`{base}` fine-tuned by forgetless with `{content.method}`: {content.method_summary}."
        )
    lines = ["---", metadata.to_yaml(), "---", "", f"# {title}", "", what, ""]
    revision = content.provenance.revision
    lines += ["## Base model", "", f"`{base}`" + (f" at revision `{revision}`" if revision else "")]
    lines.append("")
    if content.provenance.data:
        lines += ["## Training data", "", *_table(content.provenance.data, ("field", "value")), ""]
    if content.experts:
        columns = list(content.experts[0])
        lines += ["## Experts", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += [
            "| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in content.experts
        ]
        lines.append("")
    lines += ["## Method and settings", "", *_table(content.settings, ("setting", "value")), ""]
    if content.compute:
        lines += ["## Compute", "", *_table(content.compute, ("measure", "value")), ""]
    if content.diagnostics:
        lines += [
            "## Overlap diagnostics",
            "",
            *_table(content.diagnostics, ("diagnostic", "value")),
            "",
        ]
    lines += [f"## {RETENTION}", "", NOT_EVALUATED, ""]
    lines += [f"## {LOADING}", "", *_loading(LOCAL_PATH)]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, content: CardContent) -> None:
    write_text_atomic(Path(folder) / CARD_FILE, render_card(content))


def _with_section(text: str, title: str, body: str) -> str:
    """``text`` with the body of its section ``## title`` replaced (the section is appended
    when a hand-edited card lost it)."""
    lines = text.rstrip("\n").split("\n")
    heading = f"## {title}"
    if heading not in lines:
        return "\n".join([*lines, "", heading, "", body.rstrip("\n")]) + "\n"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = ["", *lines[end:]] if end < len(lines) else []
    return "\n".join([*lines[:start], "", body.rstrip("\n"), *tail]) + "\n"


def _update(folder: str | Path, title: str, body: str) -> bool:
    # Rewritten only when it changes: a finished run run again must not touch the folder.
    path = Path(folder) / CARD_FILE
    text = path.read_text(encoding="utf-8")
    updated = _with_section(text, title, body)
    if updated == text:
        return False
    write_text_atomic(path, updated)
    return True


def set_retention(folder: str | Path, markdown: str) -> bool:
    """Put the retention table (Markdown) into the card in ``folder``; whether it changed."""
    return _update(folder, RETENTION, markdown)


def set_repository(folder: str | Path, repo_id: str) -> bool:
    """Make the card's loading example name the Hub repository the folder is pushed to."""
    return _update(folder, LOADING, "\n".join(_loading(repo_id)))
