"""Medical corpora: MedQuAD, ChatDoctor, and condition-labelled medical abstracts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from forgetless.data.corpora.files import files_under, same_files, tidy_lines
from forgetless.data.readers import delimited_rows, json_rows, required, xml_root
from forgetless.data.records import Record
from forgetless.data.registry import add_builtin
from forgetless.data.splits import HASH_SPLITS, hash_split
from forgetless.data.views import MC_KINDS, choice_view, pair_view
from forgetless.errors import ForgetlessError

PAIR_KINDS = ("instruction", "text")


def _parse_medquad(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """One record per question with an answer; the questions about one focus entity (one XML
    document) share a split."""
    for path in paths:
        document = xml_root(path)
        if hash_split("medquad", document.get("id") or path.stem) != split:
            continue
        for pair in document.iter("QAPair"):
            question, answer = pair.findtext("Question"), pair.findtext("Answer")
            if question is None or answer is None:
                raise ForgetlessError(
                    f"{path}: QAPair {pair.get('pid', '?')} lacks a <Question> or an <Answer>"
                )
            question, answer = tidy_lines(question), tidy_lines(answer)
            if question and answer:  # collections 10-12 had their answers removed upstream
                yield pair_view(kind, question, answer, text=answer)


CHATDOCTOR_FILE = "medical/chatdoctor/chatdoctor5k.json"


def _parse_chatdoctor(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for where, row in json_rows(paths[0]):
        system, patient, doctor = (
            required(row, key, where) for key in ("instruction", "input", "output")
        )
        if hash_split("chatdoctor", patient) != split:
            continue
        text = f"Patient: {patient}\nDoctor: {doctor}"
        yield pair_view(kind, patient, doctor, text=text, system=system.strip() or None)


ABSTRACTS = "medical/medical_abstracts/"
# The condition labels make this a multiple-choice benchmark too: 5 % would be ~140 items, a
# 95 % interval of about +-8 points on accuracy; 20 % gives ~580 items.
ABSTRACTS_TEST_SHARE = 0.2


def _parse_medical_abstracts(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    labels_file, abstracts_file = paths
    names: dict[str, str] = {}
    for where, row in delimited_rows(labels_file, ","):
        names[required(row, "condition_label", where)] = required(row, "condition_name", where)
    conditions = tuple(names.values())
    question = "Which kind of condition does this abstract describe?"
    for where, row in delimited_rows(abstracts_file, ","):
        label, abstract = (
            required(row, "condition_label", where),
            required(row, "medical_abstract", where),
        )
        if label not in names:
            raise ForgetlessError(
                f"{where}: condition_label {label!r} is not one of {', '.join(names)}"
            )
        abstract = abstract.strip()
        if not abstract:
            raise ForgetlessError(f"{where}: empty medical_abstract")
        if hash_split("medical_abstracts", abstract, ABSTRACTS_TEST_SHARE) != split:
            continue
        listing = ", ".join(conditions)
        yield choice_view(
            kind,
            f"Abstract: {abstract}\n{question}\nAnswer:",
            conditions,
            conditions.index(names[label]),
            text=abstract,
            prompt=f"{abstract}\n\n{question} Choose one of: {listing}.",
        )


def register() -> None:
    add_builtin(
        "medquad",
        "MedQuAD consumer-health questions answered from NIH sites (collections 1-9); "
        "text = the answers. Hash split by focus document.",
        PAIR_KINDS,
        files_under("medical/medquad", ".xml"),
        _parse_medquad,
        splits=HASH_SPLITS,
    )
    add_builtin(
        "chatdoctor",
        "ChatDoctor GenMedGPT-5k synthetic patient-doctor exchanges (ChatGPT-generated).",
        PAIR_KINDS,
        same_files(CHATDOCTOR_FILE),
        _parse_chatdoctor,
        splits=HASH_SPLITS,
        terms="research only (no clinical or commercial use)",
    )
    add_builtin(
        "medical_abstracts",
        "Medical abstracts labelled with one of five patient-condition classes (the corpus's "
        "test file, hash-split 75/5/20 so the test split is a usable benchmark).",
        ("text", *[k for k in MC_KINDS if k != "text"]),
        same_files(f"{ABSTRACTS}medical_tc_labels.csv", f"{ABSTRACTS}medical_tc_test.csv"),
        _parse_medical_abstracts,
        splits=HASH_SPLITS,
        terms="share-alike (CC-BY-SA)",
    )
