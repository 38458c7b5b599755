import csv
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetless.data import (
    InstructionRecord,
    MultipleChoiceRecord,
    TextRecord,
    load_records,
    load_user_data,
)
from forgetless.errors import ForgetlessError

MC_ROWS = [
    {"question": "2 + 2 =", "options": ["3", "4", "5"], "answer": 1},
    {"question": "Capital of France?", "options": ["Paris", "Rome"], "answer": "Paris"},
    {"question": "Third letter?", "options": ["a", "b", "c", "d"], "answer": "C"},
]
MC_COLUMNS = {"query": "question", "choices": "options", "gold": "answer"}
EXPECTED_GOLDS = [1, 0, 2]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_delimited(path: Path, rows, delimiter: str) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        for row in rows:
            # Cells hold no lists: choices travel as JSON text, as users write them in csv.
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
            )
    return path


def _error(path, kind="text", **options) -> str:
    with pytest.raises(ForgetlessError) as error:
        load_user_data(path, kind, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def _check_mc(records):
    assert [r.gold for r in records] == EXPECTED_GOLDS
    first = records[0]
    assert (first.query, first.choices, first.gold) == ("2 + 2 =", ("3", "4", "5"), 1)
    assert all(isinstance(r, MultipleChoiceRecord) for r in records)


# --- formats ---------------------------------------------------------------------------------


def test_jsonl_with_default_columns(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "response": "Hello", "system": "Be brief"})
        + "\n\n  \n"
        + json.dumps({"prompt": "Bye", "response": "Ciao", "extra": 1})
        + "\n",
        encoding="utf-8",
    )
    records = load_user_data(path, "instruction")
    assert records == [
        InstructionRecord("Hi", "Hello", "Be brief", id="chat.jsonl/0"),
        InstructionRecord("Bye", "Ciao", None, id="chat.jsonl/1"),
    ]


def test_jsonl_multiple_choice_with_column_mapping(tmp_path):
    _check_mc(
        load_user_data(_write_jsonl(tmp_path / "mc.jsonl", MC_ROWS), "multiple_choice", MC_COLUMNS)
    )


def test_json_array(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(MC_ROWS, indent=2), encoding="utf-8")
    _check_mc(load_user_data(path, "multiple_choice", MC_COLUMNS))


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_with_json_encoded_choices(tmp_path, suffix, delimiter):
    path = _write_delimited(tmp_path / f"mc{suffix}", MC_ROWS, delimiter)
    _check_mc(load_user_data(path, "multiple_choice", MC_COLUMNS))


def test_parquet(tmp_path):
    path = tmp_path / "mc.parquet"
    rows = [{**row, "answer": str(row["answer"])} for row in MC_ROWS]  # one column type
    pq.write_table(pa.Table.from_pylist(rows), path)
    _check_mc(load_user_data(path, "multiple_choice", MC_COLUMNS))


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"body": "first"}, {"body": "second"}])
    test = datasets.Dataset.from_list([{"body": "held out"}])
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    columns = {"text": "body"}
    single = load_user_data(tmp_path / "single", "text", columns)
    assert [r.text for r in single] == ["first", "second"]
    assert load_user_data(tmp_path / "dict", "text", columns) == [
        TextRecord("first", id="dict/0"),
        TextRecord("second", id="dict/1"),
    ]
    assert [r.text for r in load_user_data(tmp_path / "dict", "text", columns, split="test")] == [
        "held out"
    ]
    message = _error(tmp_path / "dict", columns=columns, split="validation")
    assert "no split 'validation'; available: train, test" in message


def test_saved_dataset_errors_name_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "ok"}, {"text": ""}]).save_to_disk(str(tmp_path / "ds"))
    assert f"{tmp_path / 'ds'} row 1: column 'text' is empty" in _error(tmp_path / "ds")
    (tmp_path / "plain").mkdir()
    assert "not one written by save_to_disk" in _error(tmp_path / "plain")


def test_id_column_is_used_when_present(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "id": 7}, {"text": "b", "uid": "x"}])
    assert [r.id for r in load_user_data(path, "text")] == ["7", "t.jsonl/1"]
    path = _write_jsonl(tmp_path / "u.jsonl", [{"text": "a", "uid": "x"}])
    assert load_user_data(path, "text", {"id": "uid"})[0].id == "x"


def test_limit_and_load_records_dispatch(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    assert [r.text for r in load_records(str(path), limit=2)] == ["row 0", "row 1"]
    assert load_user_data(path, "text", limit=0) == []
    assert "data file not found" in _error(tmp_path / "missing.jsonl")
    with pytest.raises(ForgetlessError, match="data file not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ForgetlessError, match="data file not found"):
        load_records("missing.csv")


# --- gold ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "expected"),
    [(0, 0), (2, 2), ("B", 1), ("cherry", 2), ("2", 2), (" B ", 1), (1.0, 1)],
)
def test_gold_by_index_letter_or_text(tmp_path, gold, expected):
    row = {"query": "Fruit?", "choices": ["apple", "banana", "cherry"], "gold": gold}
    path = _write_jsonl(tmp_path / "g.jsonl", [row])
    assert load_user_data(path, "multiple_choice")[0].gold == expected


def test_gold_matching_a_choice_wins_over_letter_and_index(tmp_path):
    rows = [
        {"query": "q", "choices": ["B", "A"], "gold": "A"},
        {"query": "q", "choices": ["10", "0"], "gold": "0"},
    ]
    records = load_user_data(_write_jsonl(tmp_path / "g.jsonl", rows), "multiple_choice")
    assert [r.gold for r in records] == [1, 1]


@pytest.mark.parametrize(
    ("gold", "fragment"),
    [
        (3, "column 'gold' 3 is out of range for 3 choices"),
        ("D", "column 'gold' 'D' is out of range for 3 choices"),
        (-1, "column 'gold' -1 is out of range for 3 choices"),
        ("durian", "column 'gold' 'durian' is not an index, a letter A-Z or one of the choices"),
        (True, "column 'gold' must be an int, a letter or a choice, got bool"),
        (None, "column 'gold' must be an int, a letter or a choice, got null"),
    ],
)
def test_bad_gold(tmp_path, gold, fragment):
    row = {"query": "Fruit?", "choices": ["apple", "banana", "cherry"], "gold": gold}
    path = _write_jsonl(tmp_path / "g.jsonl", [row])
    assert f"{path}:1: {fragment}" in _error(path, "multiple_choice")


def test_bad_choices(tmp_path):
    rows = [{"query": "q", "choices": "not json", "gold": 0}]
    message = _error(_write_jsonl(tmp_path / "a.jsonl", rows), "multiple_choice")
    assert "column 'choices' must be a list or a JSON-encoded list" in message
    rows = [{"query": "q", "choices": ["only"], "gold": 0}]
    message = _error(_write_jsonl(tmp_path / "b.jsonl", rows), "multiple_choice")
    assert "needs at least 2 choices" in message
    rows = [{"query": "q", "choices": ["x", 3], "gold": 0}]
    message = _error(_write_jsonl(tmp_path / "c.jsonl", rows), "multiple_choice")
    assert "choice 1 must be a non-empty string, got 3" in message


# --- errors ----------------------------------------------------------------------------------


def test_malformed_jsonl_names_the_exact_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n')
    message = _error(path)
    assert message.startswith(f"{path}:4: invalid JSON: ")


def test_jsonl_row_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n["text"]\n')
    assert _error(path) == f"{path}:2: expected a JSON object, got an array"


def test_invalid_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    assert _error(path).startswith(f"{path}:3: invalid JSON")
    path.write_text('{"text": "a"}')
    assert "expected a JSON array of objects, got an object" in _error(path)
    path.write_text('[{"text": "a"}, 5]')
    assert _error(path) == f"{path} row 1: expected a JSON object, got a number"


def test_missing_column_lists_the_available_ones(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "answer": "a"}])
    message = _error(path, "instruction")
    assert message == f"{path}:1: missing column 'response'; available: prompt, answer"
    message = _error(path, "instruction", columns={"response": "reply"})
    assert "missing column 'reply' (for field 'response')" in message
    message = _error(path, "instruction", columns={"response": "answer", "system": "sys"})
    assert "missing column 'sys' (for field 'system')" in message


def test_wrong_type_and_empty_text(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": 12}])
    assert _error(path) == f"{path}:2: column 'text' must be a string, got int"
    path = _write_jsonl(tmp_path / "e.jsonl", [{"body": "  \n"}])
    assert (
        _error(path, columns={"text": "body"}) == f"{path}:1: column 'body' (for 'text') is empty"
    )


def test_csv_errors_count_physical_lines(tmp_path):
    path = tmp_path / "t.csv"
    # Row 2 spans lines 2-3 inside quotes, so the short row starts on line 4.
    path.write_text('text,label\n"two\nlines",x\nshort\n', encoding="utf-8")
    assert _error(path) == f"{path}:4: 1 fields but the header has 2"
    path.write_text("text\nfine\n\n", encoding="utf-8")
    assert load_user_data(path, "text")[0].text == "fine"
    path.write_text("", encoding="utf-8")
    assert "empty file; expected a header row" in _error(path)
    path.write_text('text\n"ok"\n""\n', encoding="utf-8")
    assert _error(path) == f"{path}:3: column 'text' is empty"


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    assert _error(path) == f"{path} row 1: column 'text' must be a string, got null"
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert "cannot read parquet" in _error(tmp_path / "junk.parquet")


def test_loading_is_all_or_nothing(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(100)] + [{"text": ""}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    assert f"{path}:101:" in _error(path)
    assert len(load_user_data(path, "text", limit=100)) == 100


def test_usage_errors(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    (tmp_path / "notes.xml").write_text("<doc/>")
    assert "unsupported file type '.xml'" in _error(tmp_path / "notes.xml")
    (tmp_path / "notes.txt").write_text("hello\n")
    assert "missing column 'prompt'" in _error(tmp_path / "notes.txt", "instruction")
    assert "unknown record kind 'dialogue'" in _error(path, "dialogue")
    assert "'query' is not a field of kind 'text'" in _error(path, columns={"query": "q"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no records found" in _error(empty)
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    assert f"{tmp_path / 'latin.jsonl'}:1: not valid UTF-8" in _error(tmp_path / "latin.jsonl")


# --- properties ------------------------------------------------------------------------------

# Surrogates cannot be written as UTF-8, and csv cannot hold NUL.
TEXTS = st.lists(
    st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1
    ).filter(str.strip),
    min_size=1,
    max_size=8,
)
# No example database: it would leave a .hypothesis folder in the checkout.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, database=None)


@PROPERTY_SETTINGS
@given(TEXTS)
def test_jsonl_round_trips_arbitrary_text(texts):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.jsonl"
        lines = [json.dumps({"text": text}, ensure_ascii=False) for text in texts]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert [r.text for r in load_user_data(path, "text")] == texts


@PROPERTY_SETTINGS
@given(TEXTS)
def test_csv_round_trips_arbitrary_text(texts):
    with tempfile.TemporaryDirectory() as folder:
        path = _write_delimited(Path(folder) / "t.csv", [{"text": text} for text in texts], ",")
        assert [r.text for r in load_user_data(path, "text")] == texts
