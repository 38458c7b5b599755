"""The training corpora and pools: splits that never leak, pools that point back to their
members, and the one-line error contract on malformed XML, SGML and CSV files."""

import dataclasses
import hashlib
import re

import pytest

from forgetless.data import DATASETS, load_dataset, registry
from forgetless.data.splits import (
    MIN_PASSAGE_CHARS,
    PASSAGE_CHARS,
    hash_split,
    passages,
)


@pytest.fixture(autouse=True)
def offline_isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("FORGETLESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FORGETLESS_DATA_DIR", raising=False)

    def no_network(url, destination):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(registry, "download_file", no_network)


# --- splits and passages ---------------------------------------------------------------------


def test_hash_split_is_stable_and_near_its_shares():
    keys = [f"document-{i}" for i in range(20000)]
    splits = [hash_split("some_set", key) for key in keys]
    assert splits == [hash_split("some_set", key) for key in keys]
    share = {name: splits.count(name) / len(keys) for name in ("train", "validation", "test")}
    assert share["train"] == pytest.approx(0.90, abs=0.01)
    assert share["validation"] == pytest.approx(0.05, abs=0.005)
    assert share["test"] == pytest.approx(0.05, abs=0.005)
    # The data set's name salts the hash: another set splits the same keys differently.
    assert splits != [hash_split("other_set", key) for key in keys]
    assert [hash_split("some_set", k, test_share=0.2) for k in keys].count("test") > 3500


def test_passages_pack_paragraphs_without_losing_text():
    paragraphs = [f"Paragraph {i} " + "word " * (20 + 13 * (i % 7)) for i in range(40)]
    packed = passages(paragraphs)
    assert all(len(p) <= PASSAGE_CHARS for p in packed)
    assert "\n".join(packed).split("\n") == paragraphs
    assert len(packed) < len(paragraphs)


def test_passages_cut_long_paragraphs_at_sentences_and_merge_a_short_tail():
    sentences = [f"Sentence number {i} says something of modest length." for i in range(60)]
    packed = passages([" ".join(sentences), "Tail."])
    assert all(p.endswith((".", "Tail.")) for p in packed)
    assert " ".join(" ".join(packed).split()) == " ".join([*sentences, "Tail."])
    assert not packed[-1].startswith("Tail.")  # the 5-character tail joined the passage before
    assert len(packed[-1]) >= MIN_PASSAGE_CHARS
    assert passages(["x" * 3000]) == ["x" * 3000]  # one sentence longer than the limit stays


# --- the corpora on the reference data -------------------------------------------------------


def _table_part(prompt: str) -> str:
    return prompt.split("\n\nQuestion:")[0]


@pytest.mark.parametrize("name", ["tatqa", "policyqa"])
def test_questions_on_one_context_share_a_split(shared_data_dir, name):
    contexts = {
        split: {
            _table_part(r.prompt)
            for r in load_dataset(name, "instruction", split, data_dir=shared_data_dir)
        }
        for split in ("train", "validation", "test")
    }
    assert not contexts["train"] & contexts["test"]
    assert not contexts["train"] & contexts["validation"]
    assert not contexts["validation"] & contexts["test"]


def test_fin_tweets_test_split_is_the_tfns_benchmark_and_never_trained_on(shared_data_dir):
    def tweets(name, split):
        records = load_dataset(name, "multiple_choice", split, data_dir=shared_data_dir)
        lines = (r.query.split("\n")[-2] for r in records)
        return {line.removeprefix("Input: ").removeprefix("Tweet: ").strip() for line in lines}

    benchmark = tweets("tfns", "test")
    assert tweets("fin_tweets", "test") == benchmark
    assert not tweets("fin_tweets", "train") & benchmark
    assert not tweets("fin_tweets", "validation") & benchmark


def test_pool_records_are_their_members_records(shared_data_dir):
    pool = load_dataset("financial_pool", "instruction", "validation", data_dir=shared_data_dir)
    members = {
        name: load_dataset(name, "instruction", "validation", data_dir=shared_data_dir)
        for name in ("fin_tweets", "xbrl_terms", "fin_formulas", "tatqa")
    }
    assert len(pool) == sum(len(records) for records in members.values())
    for record in pool:
        prefix, member, index = record.id.rsplit("/", 2)
        assert prefix == "financial_pool/validation"
        original = members[member][int(index)]
        assert original.id == f"{member}/validation/{index}"
        assert dataclasses.replace(original, id=record.id) == record
    # A fixed shuffle: the first records are not all from the first member.
    assert len({r.id.split("/")[2] for r in pool[:50]}) > 1
    again = load_dataset("financial_pool", "instruction", "validation", data_dir=shared_data_dir)
    assert [r.id for r in again] == [r.id for r in pool]


def test_pool_text_view_cuts_documents_into_passages(shared_data_dir):
    pool = load_dataset("legal_pool", "text", "validation", data_dir=shared_data_dir)
    statutes = [r for r in pool if "/uscode/" in r.id]
    assert all(re.fullmatch(r"legal_pool/validation/uscode/\d+\.\d+", r.id) for r in statutes)
    assert sum(len(r.text) <= PASSAGE_CHARS for r in statutes) / len(statutes) > 0.9
    # Question-answer text is never cut.
    assert all(
        re.fullmatch(r"legal_pool/validation/policyqa/\d+", r.id)
        for r in pool
        if "/policyqa/" in r.id
    )
    sections = load_dataset("uscode", split="validation", data_dir=shared_data_dir)
    numbered = {r.id.rsplit("/", 1)[1]: r.text for r in statutes}
    first = [numbered[f"0.{part}"] for part in range(len(numbered)) if f"0.{part}" in numbered]
    assert "\n".join(first) == sections[0].text


def test_uscode_keeps_the_statutes_and_drops_editorial_matter(shared_data_dir):
    sections = load_dataset("uscode", split="train", data_dir=shared_data_dir)
    first_lines = [r.text.split("\n", 1)[0] for r in sections]
    assert all(re.match(r"\d+A? U\.S\.C\. (§|App\. Rule)", line) for line in first_lines)
    assert any("App. Rule" in line for line in first_lines)  # the court rules are there
    assert not any(line.split(". ", 1)[-1].startswith("Repealed") for line in first_lines)
    assert not any("Editorial Notes" in r.text or "<" in r.text[:200] for r in sections)


def test_wikipedia_drops_stubs(shared_data_dir):
    from forgetless.data.corpora.general import WIKIPEDIA_MIN_CHARS

    articles = load_dataset("wikipedia", split="validation", data_dir=shared_data_dir)
    assert all(len(r.text.split("\n", 1)[1]) >= WIKIPEDIA_MIN_CHARS for r in articles)


# --- malformed files: one line naming file and line, exit code 2 -----------------------------


@pytest.fixture
def data_dir_with(tmp_path, shared_data_dir, monkeypatch):
    """A data directory holding a data set's reference files, one of them replaced; the
    registry is told the replacement's digest, so only the parser can object to it."""

    def build(name: str, relpath: str, content: bytes):
        root = tmp_path / "data"
        for rel in DATASETS[name].all_files():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel == relpath:
                target.write_bytes(content)
            else:
                target.symlink_to(shared_data_dir / rel)
        table = dict(registry.sources())
        digest = hashlib.sha256(content).hexdigest()
        table[relpath] = dataclasses.replace(table[relpath], sha256=digest, bytes=len(content))
        monkeypatch.setattr(registry, "sources", lambda: table)
        return root, root / relpath

    return build


MALFORMED = {
    "xml": (
        "uscode",
        "legal/uscode/usc01.xml",
        b'<?xml version="1.0"?>\n<uscDoc>\n<main>\n<section><num>1</num>\n</uscDoc>\n',
        5,
        "malformed XML",
    ),
    "sgml": (
        "reuters",
        "general/reuters21578/reut2-000.sgm",
        b'<REUTERS NEWID="1">\n<TEXT><BODY>Fine.</BODY></TEXT>\n</REUTERS>\n'
        b'<REUTERS NEWID="2">\n<TEXT><BODY>Never closed.\n<REUTERS NEWID="3">\n</REUTERS>\n',
        4,
        "<REUTERS> opened here is never closed",
    ),
    "csv": (
        "medical_abstracts",
        "medical/medical_abstracts/medical_tc_test.csv",
        b'condition_label,medical_abstract\n1,"A fine abstract."\n9,"An unknown label."\n',
        3,
        "condition_label '9' is not one of 1, 2, 3, 4, 5",
    ),
    "csv-fields": (
        "fin_tweets",
        "financial/twitter_fin_sentiment/sent_train.csv",
        b"text,label\n$X up,1\n$Y down,0,extra\n",
        3,
        "3 fields but the header has 2",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_one_line_naming_file_and_line(case, data_dir_with, run_cli):
    name, relpath, content, line, message = MALFORMED[case]
    root, path = data_dir_with(name, relpath, content)
    code, _, err = run_cli(["data", "info", name, "--data-dir", str(root)])
    assert code == 2
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}:{line}: ")
    assert message in lines[0]


def test_a_pool_record_names_its_member():
    from forgetless.data.pools import pool_member

    assert pool_member("medical_pool/train/medquad/17") == "medquad"
    assert pool_member("web_pool/test/reuters/154.0") == "reuters"
    assert pool_member("pubmedqa/test/17") is None  # not a pool
    assert pool_member("medical_pool/train") is None
