"""Financial corpora: finance tweets, FinLoRA's XBRL-term and formula tasks, and TAT-QA."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from forgetless.data.corpora.files import same_files
from forgetless.data.readers import delimited_rows, json_rows, jsonl_rows, required
from forgetless.data.records import Record
from forgetless.data.registry import Parser, add_builtin
from forgetless.data.splits import HASH_SPLITS, hash_split
from forgetless.data.views import MC_KINDS, choice_view, pair_view
from forgetless.errors import ForgetlessError

PAIR_KINDS = ("instruction", "text")

TWEETS = "financial/twitter_fin_sentiment/"
TWEET_LABELS = ("bearish", "bullish", "neutral")  # the files' 0, 1, 2


def _tweet_files(split: str, subset: str | None) -> tuple[str, ...]:
    # The upstream validation file is our test split: it holds exactly the 2,388 tweets of the
    # `tfns` benchmark, so no split used for training may draw from it.
    return (f"{TWEETS}sent_valid.csv",) if split == "test" else (f"{TWEETS}sent_train.csv",)


def _parse_fin_tweets(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    for where, row in delimited_rows(paths[0], ","):
        tweet, label = required(row, "text", where).strip(), required(row, "label", where)
        if label not in ("0", "1", "2"):
            raise ForgetlessError(f"{where}: label {label!r} is not 0, 1 or 2")
        if not tweet:
            raise ForgetlessError(f"{where}: empty text")
        if split != "test" and hash_split("fin_tweets", tweet) != split:
            continue
        yield choice_view(
            kind,
            f"Tweet: {tweet}\nSentiment:",
            TWEET_LABELS,
            int(label),
            text=tweet,
            prompt=f"Is this finance tweet bearish, bullish or neutral?\n{tweet}",
        )


def _finlora_task(name: str) -> Parser:
    """FinLoRA training rows {context, target}: the context ends in 'Answer:'."""

    def parse(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
        for where, row in jsonl_rows(paths[0]):
            context = required(row, "context", where).strip()
            target = required(row, "target", where).strip()
            if not context or not target:
                raise ForgetlessError(f"{where}: empty context or target")
            if hash_split(name, context) != split:
                continue
            prompt = context.removesuffix("Answer:").rstrip()
            yield pair_view(kind, prompt, target, text=f"{context} {target}")

    return parse


TATQA = "financial/tatqa/"


def _table_as_text(rows: list, where: str) -> str:
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise ForgetlessError(f"{where}: table must be a list of rows")
    lines = (" | ".join(" ".join(str(cell).split()) for cell in row) for row in rows)
    return "\n".join(line for line in lines if line.strip(" |"))


def _number(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _tatqa_answer(question: dict, where: str) -> str:
    answer = question.get("answer")
    if isinstance(answer, list) and answer:
        value = ", ".join(str(part) for part in answer)
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        value = _number(answer)
    elif isinstance(answer, str) and answer.strip():
        value = answer.strip()
    else:
        raise ForgetlessError(f"{where}: question {question.get('uid', '?')} has no answer")
    scale = question.get("scale") or ""
    value = f"{value}%" if scale == "percent" else f"{value} {scale}".rstrip()
    derivation = (question.get("derivation") or "").strip()
    if question.get("answer_type") == "arithmetic" and derivation:
        return f"{derivation} = {value}"
    return value


def _parse_tatqa(paths: Sequence[Path], kind: str, split: str) -> Iterator[Record]:
    """Every question with its table (rendered as text) and paragraphs; the questions on one
    table share a split."""
    for path in paths:
        for where, context in json_rows(path):
            table = required(context, "table", where, dict)
            rendered = _table_as_text(required(table, "table", where, list), where)
            # Keyed by the table's content, not its uid: a table reported twice is one table.
            if hash_split("tatqa", rendered) != split:
                continue
            paragraphs = sorted(required(context, "paragraphs", where, list), key=_order)
            body = "\n".join(required(p, "text", where).strip() for p in paragraphs)
            for question in required(context, "questions", where, list):
                asked = required(question, "question", where).strip()
                prompt = f"Table:\n{rendered}\n\n{body}\n\nQuestion: {asked}"
                response = _tatqa_answer(question, where)
                yield pair_view(kind, prompt, response, text=f"{prompt}\nAnswer: {response}")


def _order(paragraph: dict) -> int:
    order = paragraph.get("order", 0)
    return order if isinstance(order, int) else 0


def register() -> None:
    add_builtin(
        "fin_tweets",
        "Twitter financial news sentiment (bearish/bullish/neutral); train and validation "
        "are a hash split of the upstream train file, test is its validation file (= the "
        "tfns benchmark's tweets).",
        ("text", *[k for k in MC_KINDS if k != "text"]),
        _tweet_files,
        _parse_fin_tweets,
        splits=HASH_SPLITS,
    )
    for name, stem, summary in (
        ("xbrl_terms", "xbrl_term", "FinLoRA: explain an XBRL reporting term in one sentence."),
        (
            "fin_formulas",
            "formula",
            "FinLoRA: apply a finance formula (NPV, ratios, ...) to a question; numeric answers.",
        ),
    ):
        add_builtin(
            name,
            summary,
            PAIR_KINDS,
            same_files(f"financial/finlora/{stem}_train.jsonl"),
            _finlora_task(name),
            splits=HASH_SPLITS,
        )
    add_builtin(
        "tatqa",
        "TAT-QA questions over annual-report tables and paragraphs (its public dev and test "
        "files pooled and hash-split by table: do not report TAT-QA results from them).",
        PAIR_KINDS,
        same_files(f"{TATQA}tatqa_dataset_dev.json", f"{TATQA}tatqa_dataset_test_gold.json"),
        _parse_tatqa,
        splits=HASH_SPLITS,
    )
