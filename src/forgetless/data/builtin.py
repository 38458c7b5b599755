"""Parsers for the built-in benchmarks and continual-learning tasks, and their registration.

The larger training corpora live in :mod:`forgetless.data.corpora`.

Multiple-choice prompts follow lm-evaluation-harness conventions (query without a trailing
space, choices joined with a single space) so scores are comparable with published numbers.
Every multiple-choice set also offers ``instruction`` (the query answered by the gold choice)
and ``text`` (a plain rendering for language modelling).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from forgetless.data.records import InstructionRecord, Record, TextRecord
from forgetless.data.registry import FileLister, Parser, add_builtin
from forgetless.data.views import MC_KINDS, choice_view

# LegalBench and EUR-Lex rows hold whole regulations in one field, beyond csv's 128 KiB default.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _read_json(path: Path):
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _read_tsv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter="\t")


def _fixed(*relpaths: str) -> FileLister:
    return lambda split, subset: relpaths


def _templated(*templates: str) -> FileLister:
    return lambda split, subset: tuple(t.format(split=split, subset=subset) for t in templates)


# --- general ---------------------------------------------------------------------------------


def _parse_gsm8k(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for row in _read_jsonl(paths[0]):
        question, answer = row["question"], row["answer"]
        if kind == "instruction":
            yield InstructionRecord(prompt=question, response=answer)
        else:
            yield TextRecord(text=f"{question}\n{answer}")


def _foundrychoice_view(make_query: Callable[[str], str]) -> Parser:
    """llm-foundry's local eval files: {"query", "choices", "gold"}, queries in its own format."""

    def parse(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
        for row in _read_jsonl(paths[0]):
            yield choice_view(kind, make_query(row["query"]), row["choices"], row["gold"])

    return parse


def _piqa_query(query: str) -> str:
    # The file's queries are "Question: {goal}\n"; lm-eval's are "Question: {goal}\nAnswer:".
    return query.removesuffix("\n") + "\nAnswer:"


def _boolq_query(query: str) -> str:
    # The file holds "Passage: {passage}\nQuestion: {question}?"; lm-eval's format is
    # "{passage}\nQuestion: {question}?\nAnswer:". (lm-eval's super_glue passages also carry a
    # "Title -- " prefix that this file dropped, so scores are close but not identical.)
    return query.removeprefix("Passage: ") + "\nAnswer:"


def _parse_c4(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for row in _read_jsonl(paths[0]):
        yield TextRecord(text=row["text"])


# --- medical ---------------------------------------------------------------------------------

PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def _parse_pubmedqa(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    articles, test_pmids = _read_json(paths[0]), _read_json(paths[1])
    for pmid, article in articles.items():
        if (pmid in test_pmids) != (split == "test"):
            continue
        abstract = "\n".join(article["CONTEXTS"])
        question, decision = article["QUESTION"], article["final_decision"]
        if kind == "text":
            yield TextRecord(text=f"{abstract}\n{article['LONG_ANSWER']}")
        elif kind == "instruction":
            prompt = f"{abstract}\n\nQuestion: {question}\nAnswer yes, no or maybe."
            yield InstructionRecord(prompt=prompt, response=decision)
        else:
            query = f"Abstract: {abstract}\nQuestion: {question}\nAnswer:"
            gold = PUBMEDQA_CHOICES.index(decision)
            yield choice_view(kind, query, PUBMEDQA_CHOICES, gold, meta={"pmid": pmid})


def _parse_medagents(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """MedAgents-benchmark rows: question, options {letter: text}, answer_idx letter."""
    for row in _read_jsonl(paths[0]):
        letters = sorted(row["options"])
        options = [row["options"][letter] for letter in letters]
        gold = letters.index(row["answer_idx"])
        question = row["question"].strip()
        listing = "\n".join(
            f"{letter}. {text}" for letter, text in zip(letters, options, strict=True)
        )
        yield choice_view(
            kind,
            f"Question: {question}\nAnswer:",
            options,
            gold,
            text=f"{question} {options[gold]}",
            prompt=f"{question}\n\nOptions:\n{listing}\n\nAnswer with the correct option.",
            response=f"{letters[gold]}. {options[gold]}",
            meta={"realidx": str(row["realidx"])},
        )


# --- financial -------------------------------------------------------------------------------

SENTIMENTS = ("negative", "neutral", "positive")


def _parse_fpb(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    # The Financial PhraseBank is distributed in Latin-1, not UTF-8 (a few sentences hold
    # non-ASCII bytes); Latin-1 maps every byte, so nothing is dropped.
    with paths[0].open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            content = row["content"]
            yield choice_view(
                kind,
                f"Sentence: {content}\nSentiment:",
                SENTIMENTS,
                SENTIMENTS.index(row["label"]),
                text=content,
                prompt=(
                    "What is the sentiment of this financial news sentence? "
                    f"Answer negative, neutral or positive.\n{content}"
                ),
            )


_BRACED_LABELS = re.compile(r"\{([^{}]*)\}")


def _parse_finlora(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """FinLoRA rows: "Instruction: ... {a/b/c}.\\nInput: ...\\nAnswer: " and a target label."""
    for row in _read_jsonl(paths[0]):
        context = row["context"].rstrip()
        # The label set sits in the instruction line; inputs may hold braces of their own.
        labels = tuple(_BRACED_LABELS.search(context.split("\n", 1)[0]).group(1).split("/"))
        start = context.index("\nInput: ") + len("\nInput: ")
        sentence = context[start : context.rindex("\nAnswer")]
        yield choice_view(kind, context, labels, labels.index(row["target"]), text=sentence)


# --- legal -----------------------------------------------------------------------------------


def _parse_text_column(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for row in _read_tsv(paths[0]):
        yield TextRecord(text=row["text"])


YES_NO = ("No", "Yes")


def _cuad(question: str) -> Parser:
    """A CUAD clause-classification task, posed as a yes/no question about the clause."""

    def parse(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
        for row in _read_tsv(paths[0]):
            clause = row["text"].strip()
            yield choice_view(
                kind,
                f"Clause: {clause}\n{question}\nAnswer:",
                YES_NO,
                YES_NO.index(row["label"]),
                text=clause,
                prompt=f"Clause: {clause}\n{question} Answer Yes or No.",
            )

    return parse


# The order of LegalBench's task description; fixed so choice indices never move.
UNFAIR_TOS_LABELS = (
    "Arbitration",
    "Unilateral change",
    "Content removal",
    "Jurisdiction",
    "Choice of law",
    "Limitation of liability",
    "Unilateral termination",
    "Contract by using",
    "Other",
)


def _parse_unfair_tos(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    question = (
        "Which kind of potentially unfair term is this clause from a terms of service? "
        f"Choose one from the options: {', '.join(UNFAIR_TOS_LABELS)}"
    )
    for row in _read_tsv(paths[0]):
        clause = row["text"].strip()
        body = f"Clause: {clause}\n{question}"
        gold = UNFAIR_TOS_LABELS.index(row["label"])
        yield choice_view(
            kind, f"{body}\nAnswer:", UNFAIR_TOS_LABELS, gold, text=clause, prompt=body
        )


# --- continual learning ----------------------------------------------------------------------

# Labels exactly as the files spell them (typos included), in order of first appearance in the
# 0_42 training file, so choice indices are the same for every subset and split.
FEWSHOT_TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "fewshot_agnews": ("ag_news", "topic", ("business", "science", "sports", "world")),
    "fewshot_amazon": (
        "amazon_review_full",
        "sentiment",
        ("middle", "wonderful", "good", "terrible", "bad"),
    ),
    "fewshot_dbpedia": (
        "dbpedia",
        "topic",
        (
            "company",
            "educationalinstitution",
            "artist",
            "thlete",
            "officeholder",
            "meanoftransportation",
            "building",
            "naturalplace",
            "village",
            "animal",
            "plant",
            "album",
            "film",
            "writtenwork",
        ),
    ),
    "fewshot_yahoo": (
        "yahoo_answers",
        "topic",
        (
            "computers and internet",
            "sports",
            "health",
            "business",
            "science",
            "entertainment and Music",
            "education and reference",
            "family and relationships",
            "politics and government",
            "society and culture",
        ),
    ),
}
FEWSHOT_SUBSETS = ("0_42", "1_142", "2_242")


def _fewshot(aspect: str, labels: tuple[str, ...]) -> Parser:
    """Lifelong few-shot files: one "paragraph<TAB>label" per line."""
    header = (
        f"What is the {aspect} of the following paragraph? "
        f"Choose one from the options: {', '.join(labels)}"
    )

    def parse(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
        with paths[0].open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                paragraph, label = line.rstrip("\n").rsplit("\t", 1)
                paragraph = paragraph.strip()
                body = f"{header}\n{paragraph}"
                gold = labels.index(label)
                yield choice_view(
                    kind, f"{body}\nAnswer:", labels, gold, text=paragraph, prompt=body
                )

    return parse


OLORA_TASKS = {
    "olora_sst2": "SST-2",
    "olora_amazon": "amazon",
    "olora_agnews": "agnews",
    "olora_cb": "CB",
    "olora_rte": "RTE",
    "olora_mnli": "MNLI",
    "olora_qqp": "QQP",
    "olora_boolqa": "BoolQA",
    "olora_copa": "COPA",
    "olora_wic": "WiC",
}


def _parse_olora(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """O-LoRA CL_Benchmark: a JSON list of {"sentence", "label"} plus labels.json."""
    rows, labels = _read_json(paths[0]), tuple(_read_json(paths[1]))
    for row in rows:
        # MNLI's test file keeps 131 pairs whose annotators disagreed (label "-"): no gold.
        if row["label"] not in labels:
            continue
        sentence = row["sentence"].strip()
        query = f"{sentence}\nOptions: {', '.join(labels)}\nAnswer:"
        yield choice_view(kind, query, labels, labels.index(row["label"]), text=sentence)


# --- registration ----------------------------------------------------------------------------


def _register_all() -> None:
    general = "general/{}.jsonl"
    add_builtin(
        "gsm8k",
        "Grade-school math word problems with worked solutions ending in '#### answer'.",
        ("instruction", "text"),
        _templated("general/gsm8k/{split}.jsonl"),
        _parse_gsm8k,
        splits=("train", "test"),
    )
    foundry = {
        "arc_easy": ("ARC-Easy grade-school science questions.", lambda q: f"{q}\nAnswer:"),
        "arc_challenge": ("ARC-Challenge science questions.", lambda q: f"{q}\nAnswer:"),
        "piqa": ("PIQA physical commonsense.", _piqa_query),
        "boolq": ("BoolQ yes/no reading comprehension.", _boolq_query),
        "openbook_qa": ("OpenBookQA elementary science.", lambda q: q),
        "commonsense_qa": ("CommonsenseQA with lettered options.", lambda q: q),
    }
    for name, (summary, make_query) in foundry.items():
        add_builtin(
            name, summary, MC_KINDS, _fixed(general.format(name)), _foundrychoice_view(make_query)
        )
    add_builtin(
        "c4",
        "A 1000-document sample of the C4 web corpus.",
        ("text",),
        _fixed("general/c4-sample.jsonl.gz"),
        _parse_c4,
    )

    add_builtin(
        "pubmedqa",
        "PubMedQA expert-labelled abstracts (yes/no/maybe); test = the official 500 test PMIDs.",
        ("text", "multiple_choice", "instruction"),
        _fixed("medical/pubmedqa/ori_pqal.json", "medical/pubmedqa/test_ground_truth.json"),
        _parse_pubmedqa,
        splits=("train", "test"),
    )
    for name, summary in {
        "medmcqa": "MedMCQA Indian medical entrance exam questions (4 options).",
        "medexqa": "MedExQA medical specialty questions (4 options).",
        "medbullets": "Medbullets USMLE step 2/3 style questions (5 options).",
    }.items():
        add_builtin(name, summary, MC_KINDS, _fixed(f"medical/{name}/test.jsonl"), _parse_medagents)

    add_builtin(
        "financial_phrasebank",
        "Financial PhraseBank sentence sentiment (all annotator agreement levels).",
        MC_KINDS,
        _fixed("financial/fpb/all-data.csv"),
        _parse_fpb,
        terms="non-commercial (CC-BY-NC-SA)",
    )
    for name, stem, summary in (
        ("fiqa", "fiqa", "FiQA financial headline and tweet sentiment (FinLoRA prompts)."),
        ("tfns", "tfns", "Twitter financial news sentiment (FinLoRA prompts)."),
        ("nwgi", "nwgi", "NWGI news sentiment on a 7-point scale (FinLoRA prompts)."),
        ("fpb_finlora", "fpb", "Financial PhraseBank test split (FinLoRA prompts)."),
    ):
        files = _fixed(f"financial/finlora/{stem}_test.jsonl")
        add_builtin(name, summary, MC_KINDS, files, _parse_finlora)

    legal = "legal/legalbench/{}/test.tsv"
    add_builtin(
        "eurlex",
        "EUR-Lex legislative acts (LegalBench), as plain legal text.",
        ("text",),
        _templated("legal/legalbench/eurlex/{split}.tsv"),
        _parse_text_column,
        splits=("train", "test"),
    )
    legal_kinds = ("text", "multiple_choice", "instruction")
    for name, folder, question in (
        (
            "cuad_anti_assignment",
            "CUAD_Anti-Assignment",
            "Does this clause restrict assignment of the contract without consent or notice?",
        ),
        (
            "cuad_non_compete",
            "CUAD_Non-Compete",
            "Does this clause restrict a party from competing with the counterparty or from "
            "operating in a certain business or region?",
        ),
        (
            "cuad_governing_law",
            "CUAD_Governing_Law",
            "Does this clause name the law of a state or country as governing the contract?",
        ),
        (
            "cuad_termination_for_convenience",
            "CUAD_Termination_For_Convenience",
            "Does this clause let a party terminate the contract without cause?",
        ),
    ):
        summary = f"CUAD contract clauses (LegalBench {folder}), labelled Yes/No."
        add_builtin(name, summary, legal_kinds, _fixed(legal.format(folder)), _cuad(question))
    add_builtin(
        "unfair_tos",
        "Terms-of-service sentences labelled with the kind of unfair term, or Other (LegalBench).",
        legal_kinds,
        _fixed(legal.format("unfair_tos")),
        _parse_unfair_tos,
    )

    for name, (folder, aspect, labels) in FEWSHOT_TASKS.items():
        add_builtin(
            name,
            f"Lifelong few-shot text classification: {folder} ({len(labels)} labels).",
            MC_KINDS,
            _templated(f"cl/fewshot/{folder}/{{subset}}/{{split}}.txt"),
            _fewshot(aspect, labels),
            splits=("train", "valid", "test"),
            subsets=FEWSHOT_SUBSETS,
        )
    for name, folder in OLORA_TASKS.items():
        add_builtin(
            name,
            f"O-LoRA continual-learning benchmark task {folder}.",
            MC_KINDS,
            _templated(f"cl/olora/{folder}/{{split}}.json", f"cl/olora/{folder}/labels.json"),
            _parse_olora,
            splits=("train", "test"),
        )


_register_all()
