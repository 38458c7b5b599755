"""Legal corpora: United States Code sections (USLM XML) and PolicyQA."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

from forgetless.data.corpora.files import files_under, same_files, tidy_lines
from forgetless.data.readers import json_document, required, xml_root
from forgetless.data.records import Record, TextRecord
from forgetless.data.registry import add_builtin
from forgetless.data.splits import HASH_SPLITS, hash_split
from forgetless.data.views import pair_view
from forgetless.errors import ForgetlessError

# Editorial matter around the statute's own words: amendment notes, source credits, tables of
# contents. Sections quoted inside notes (amending acts) are not sections of the Code.
SKIPPED = {"notes", "note", "sourceCredit", "toc", "footnote"}
# Elements that start a new line of the rendered text.
BLOCKS = {
    "subsection", "paragraph", "subparagraph", "clause", "subclause", "item", "subitem",
    "subsubitem", "content", "chapeau", "continuation", "p", "tr", "quotedContent",
}  # fmt: skip
# Placeholders whose whole text is a heading such as "Repealed. Pub. L. ...".
GONE = {"repealed", "omitted", "renumbered", "transferred"}


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _render(element: ET.Element, out: list[str], after_number: bool = False) -> None:
    # "(a)" and the provision it numbers share a line; any other block starts a new one.
    if _local(element.tag) in BLOCKS and not after_number:
        out.append("\n")
    if element.text:
        out.append(element.text)
    previous = ""
    for child in element:
        if _local(child.tag) not in SKIPPED:
            _render(child, out, after_number=previous == "num")
        if child.tail:
            out.append(child.tail)
        if _local(child.tag) in ("td", "th"):
            out.append(" ")
        previous = _local(child.tag)


def _statutes(element: ET.Element) -> Iterator[ET.Element]:
    """Sections and court rules of the Code itself, not those quoted inside notes."""
    for child in element:
        tag = _local(child.tag)
        if tag in ("section", "courtRule"):
            yield child
        elif tag not in SKIPPED and tag != "quotedContent":
            yield from _statutes(child)


def _parse_uscode(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """One record per section (court rule in the appendices): citation, heading and text,
    markup, notes and source credits stripped."""
    for path in paths:
        root = xml_root(path)
        if _local(root.tag) != "uscDoc":
            raise ForgetlessError(f"{path}: not a USLM title (root <{_local(root.tag)}>)")
        title = (path.stem.removeprefix("usc").lstrip("0") or "0").upper()
        for index, statute in enumerate(_statutes(root)):
            if statute.get("status") in GONE:
                continue
            key = statute.get("identifier") or f"{path.name}#{index}"
            if hash_split("uscode", key) != split:
                continue
            pieces: list[str] = []
            _render(statute, pieces)
            text = tidy_lines("".join(pieces))
            if "\n" not in text:  # a heading without any provision under it
                continue
            prefix = (
                f"{title} U.S.C. " if _local(statute.tag) == "section" else f"{title} U.S.C. App. "
            )
            yield TextRecord(text=prefix + text)


POLICYQA = "legal/policyqa/"


def _parse_policyqa(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """Questions on privacy-policy passages with their extracted answer; the questions on one
    passage share a split."""
    for path in paths:
        document = json_document(path)
        if not isinstance(document, dict):
            raise ForgetlessError(f"{path}: expected a SQuAD-style object with 'data'")
        for index, policy in enumerate(required(document, "data", str(path), list)):
            where = f"{path} data[{index}]"
            required(policy, "title", where)
            for number, passage in enumerate(required(policy, "paragraphs", where, list)):
                at = f"{where} paragraphs[{number}]"
                context = " ".join(required(passage, "context", at).split())
                # Keyed by the text: boilerplate passages recur across policies.
                if hash_split("policyqa", context) != split:
                    continue
                for qa in required(passage, "qas", at, list):
                    answers = required(qa, "answers", at, list)
                    if not answers:
                        raise ForgetlessError(f"{at}: question {qa.get('id', '?')} has no answer")
                    answer = " ".join(required(answers[0], "text", at).split())
                    question = " ".join(required(qa, "question", at).split())
                    prompt = f"Privacy policy excerpt: {context}\n\nQuestion: {question}"
                    yield pair_view(kind, prompt, answer, text=f"{prompt}\nAnswer: {answer}")


def register() -> None:
    add_builtin(
        "uscode",
        "United States Code (22 titles of USLM XML, with the Federal Rules of Bankruptcy and "
        "Criminal Procedure): one record per section or rule, markup and notes stripped.",
        ("text",),
        files_under("legal/uscode", ".xml"),
        _parse_uscode,
        splits=HASH_SPLITS,
    )
    add_builtin(
        "policyqa",
        "PolicyQA questions on website privacy policies with extracted answers (its public "
        "dev and test files pooled and hash-split by passage: do not report PolicyQA results "
        "from them).",
        ("instruction", "text"),
        same_files(f"{POLICYQA}dev.json", f"{POLICYQA}test.json"),
        _parse_policyqa,
        splits=HASH_SPLITS,
        terms="non-commercial (policy texts from OPP-115, CC-BY-NC)",
    )
