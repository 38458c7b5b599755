import csv
import hashlib
import json
import shutil
import urllib.error
from pathlib import Path

import pytest

from forgetless.data import (
    DATASETS,
    InstructionRecord,
    TextRecord,
    builtin,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    load_records,
    registry,
    resolve_data_file,
)
from forgetless.data.records import RECORD_TYPES
from forgetless.errors import ForgetlessError

# Sizes of the pinned upstream files; a change means a parser started dropping or inventing rows.
EXPECTED_COUNTS = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("arc_easy", "test"): 2376,
    ("arc_challenge", "test"): 1172,
    ("piqa", "test"): 1838,
    ("boolq", "test"): 3270,
    ("openbook_qa", "test"): 500,
    ("commonsense_qa", "test"): 1221,
    ("c4", "test"): 1000,
    ("pubmedqa", "train"): 500,
    ("pubmedqa", "test"): 500,
    ("medmcqa", "test"): 2816,
    ("medexqa", "test"): 935,
    ("medbullets", "test"): 308,
    ("financial_phrasebank", "test"): 4846,
    ("fiqa", "test"): 235,
    ("tfns", "test"): 2388,
    ("nwgi", "test"): 4047,
    ("fpb_finlora", "test"): 1212,
    ("eurlex", "train"): 60,
    ("eurlex", "test"): 29,
    ("cuad_anti_assignment", "test"): 1206,
    ("cuad_non_compete", "test"): 444,
    ("cuad_governing_law", "test"): 904,
    ("cuad_termination_for_convenience", "test"): 436,
    ("unfair_tos", "test"): 3841,
    ("fewshot_agnews", "train"): 64,
    ("fewshot_agnews", "valid"): 64,
    ("fewshot_agnews", "test"): 400,
    ("fewshot_amazon", "train"): 80,
    ("fewshot_amazon", "valid"): 80,
    ("fewshot_amazon", "test"): 500,
    ("fewshot_dbpedia", "train"): 224,
    ("fewshot_dbpedia", "valid"): 224,
    ("fewshot_dbpedia", "test"): 1400,
    ("fewshot_yahoo", "train"): 160,
    ("fewshot_yahoo", "valid"): 160,
    ("fewshot_yahoo", "test"): 1000,
    ("olora_sst2", "train"): 2000,
    ("olora_sst2", "test"): 872,
    ("olora_amazon", "train"): 5000,
    ("olora_amazon", "test"): 7600,
    ("olora_agnews", "train"): 4000,
    ("olora_agnews", "test"): 7600,
    ("olora_cb", "train"): 250,
    ("olora_cb", "test"): 56,
    ("olora_rte", "train"): 2000,
    ("olora_rte", "test"): 277,
    ("olora_mnli", "train"): 3000,
    ("olora_mnli", "test"): 7469,  # 7600 rows less the 131 without a gold label
    ("olora_qqp", "train"): 2000,
    ("olora_qqp", "test"): 7600,
    ("olora_boolqa", "train"): 2000,
    ("olora_boolqa", "test"): 3270,
    ("olora_copa", "train"): 400,
    ("olora_copa", "test"): 100,
    ("olora_wic", "train"): 2000,
    ("olora_wic", "test"): 638,
    ("fin_tweets", "train"): 8543,
    ("fin_tweets", "validation"): 508,
    ("fin_tweets", "test"): 2388,
    ("xbrl_terms", "train"): 5287,
    ("xbrl_terms", "validation"): 288,
    ("xbrl_terms", "test"): 281,
    ("fin_formulas", "train"): 720,
    ("fin_formulas", "validation"): 30,
    ("fin_formulas", "test"): 50,
    ("tatqa", "train"): 2941,
    ("tatqa", "validation"): 210,
    ("tatqa", "test"): 180,
    ("t0_instruct", "train"): 29946,
    ("t0_instruct", "validation"): 1654,
    ("t0_instruct", "test"): 1623,
    ("alpaca_sample", "train"): 910,
    ("alpaca_sample", "validation"): 46,
    ("alpaca_sample", "test"): 43,
    ("reuters", "train"): 17132,
    ("reuters", "validation"): 950,
    ("reuters", "test"): 961,
    ("wikipedia", "train"): 3011,
    ("wikipedia", "validation"): 148,
    ("wikipedia", "test"): 152,
    ("uscode", "train"): 3076,
    ("uscode", "validation"): 157,
    ("uscode", "test"): 161,
    ("policyqa", "train"): 7107,
    ("policyqa", "validation"): 466,
    ("policyqa", "test"): 388,
    ("medquad", "train"): 14707,
    ("medquad", "validation"): 859,
    ("medquad", "test"): 841,
    ("chatdoctor", "train"): 4885,
    ("chatdoctor", "validation"): 275,
    ("chatdoctor", "test"): 292,
    ("medical_abstracts", "train"): 2175,
    ("medical_abstracts", "validation"): 149,
    ("medical_abstracts", "test"): 564,
    ("medical_pool", "train"): 21767,
    ("medical_pool", "validation"): 1283,
    ("medical_pool", "test"): 1697,
    ("financial_pool", "train"): 17491,
    ("financial_pool", "validation"): 1036,
    ("financial_pool", "test"): 2899,
    ("legal_pool", "train"): 16196,
    ("legal_pool", "validation"): 844,
    ("legal_pool", "test"): 821,
    ("web_pool", "train"): 33576,
    ("web_pool", "validation"): 1791,
    ("web_pool", "test"): 1746,
    ("replay_pool", "train"): 30856,
    ("replay_pool", "validation"): 1700,
    ("replay_pool", "test"): 1666,
}


@pytest.fixture(autouse=True)
def offline_isolated(monkeypatch, tmp_path):
    """A private user cache, no data dir from the environment, and no network."""
    monkeypatch.setenv("FORGETLESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FORGETLESS_DATA_DIR", raising=False)
    monkeypatch.setattr(registry, "_VERIFIED", set())

    def no_network(url, destination):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(registry, "download_file", no_network)


def _combinations():
    for name, spec in DATASETS.items():
        for split in spec.splits:
            for subset in spec.subsets or (None,):
                yield pytest.param(name, split, subset, id=f"{name}-{split}-{subset}")


def _check_record(record, kind: str) -> None:
    assert isinstance(record, RECORD_TYPES[kind])
    if isinstance(record, TextRecord):
        assert record.text.strip()
    elif isinstance(record, InstructionRecord):
        assert record.prompt.strip() and record.response.strip()
    else:
        assert len(record.choices) >= 2
        assert all(isinstance(c, str) and c.strip() for c in record.choices)
        assert 0 <= record.gold < len(record.choices)
        assert record.delimiter == " "
        assert record.query.strip() and record.query == record.query.rstrip()


def test_registry_covers_the_expected_data_sets():
    assert sorted({name for name, _ in EXPECTED_COUNTS}) == list_datasets()


@pytest.mark.parametrize(("name", "split", "subset"), list(_combinations()))
def test_every_data_set_loads_in_every_kind(shared_data_dir, name, split, subset):
    spec = DATASETS[name]
    prefix = "/".join(part for part in (name, subset, split) if part)
    counts = set()
    for kind in spec.kinds:
        records = load_dataset(name, kind, split, subset, data_dir=shared_data_dir)
        counts.add(len(records))
        for record in records:
            _check_record(record, kind)
        if name.endswith("_pool"):  # named after the member record (test_data_corpora.py)
            assert all(r.id.startswith(f"{prefix}/") for r in records)
            assert len({r.id for r in records}) == len(records)
        else:
            assert [r.id for r in records] == [f"{prefix}/{i}" for i in range(len(records))]
    assert counts == {EXPECTED_COUNTS[(name, split)]}


# What the pools promise (issue: pools large enough for selection and mixture experiments).
POOL_TRAIN_SIZES = {
    "medical_pool": 20_000,
    "financial_pool": 10_000,
    "legal_pool": 10_000,
    "web_pool": 30_000,
    "replay_pool": 30_000,
}


def test_pools_hold_the_promised_sizes():
    # EXPECTED_COUNTS are the sizes the loading test above checks on the real files.
    for pool, size in POOL_TRAIN_SIZES.items():
        assert EXPECTED_COUNTS[(pool, "train")] >= size
        assert EXPECTED_COUNTS[(pool, "validation")] >= 500


def test_data_list_shows_sizes_licenses_and_terms(run_cli):
    code, out, _ = run_cli(["data", "list"])
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert set(DATASETS) <= set(rows)
    assert "research only" in rows["reuters"] and "research only" in rows["chatdoctor"]
    assert "non-commercial" in rows["alpaca_sample"] and "CC-BY-NC-4.0" in rows["alpaca_sample"]
    assert "public-domain-US-Gov" in rows["uscode"]


def test_spec_defaults_and_descriptions():
    sources = registry.sources()
    for spec in DATASETS.values():
        assert spec.native_kind == spec.kinds[0]
        assert spec.default_split == ("train" if "train" in spec.splits else spec.splits[0])
        files = spec.all_files()
        assert files and all(relpath in sources for relpath in files)
        for relpath in files:
            source = sources[relpath]
            assert f"{source.source_repo}@{source.commit[:12]} ({source.license})" in (
                spec.description
            )
    assert get_dataset_spec("fewshot_agnews").default_subset == "0_42"
    assert get_dataset_spec("arc_easy").kinds[0] == "multiple_choice"
    assert get_dataset_spec("gsm8k").kinds == ("instruction", "text")


def test_sources_table_matches_shared_manifest(shared_data_dir):
    manifest = shared_data_dir / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip(f"no {manifest}")
    with manifest.open(encoding="utf-8", newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle, delimiter="\t")}
    ours = registry.sources()
    assert set(rows) == set(ours)
    for path, row in rows.items():
        assert ours[path].sha256 == row["sha256"]
        assert ours[path].bytes == int(row["bytes"])


def test_source_url_quotes_the_upstream_path():
    source = registry.sources()["legal/legalbench/CUAD_Governing_Law/test.tsv"]
    assert source.url == (
        "https://raw.githubusercontent.com/HazyResearch/legalbench/"
        f"{source.commit}/tasks/CUAD_Governing%20Law/test.tsv"
    )


# --- formats ---------------------------------------------------------------------------------


def test_lm_eval_style_queries(shared_data_dir):
    def first(name):
        return load_dataset(name, "multiple_choice", data_dir=shared_data_dir, limit=1)[0]

    arc = first("arc_easy")
    assert arc.query.startswith("Question: ") and arc.query.endswith("?\nAnswer:")
    piqa = first("piqa")
    assert (
        piqa.query == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    boolq = first("boolq")
    assert boolq.choices == ("no", "yes")
    assert not boolq.query.startswith("Passage: ")
    assert boolq.query.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert first("openbook_qa").query.startswith("A person wants to start saving money")
    med = first("medmcqa")
    assert med.query.startswith("Question: ") and med.query.endswith("\nAnswer:")
    assert len(med.choices) == 4 and len(first("medbullets").choices) == 5


def test_derived_views_of_multiple_choice(shared_data_dir):
    mc = load_dataset("arc_easy", data_dir=shared_data_dir, limit=3)
    instruction = load_dataset("arc_easy", "instruction", data_dir=shared_data_dir, limit=3)
    text = load_dataset("arc_easy", "text", data_dir=shared_data_dir, limit=3)
    for m, i, t in zip(mc, instruction, text, strict=True):
        assert i.prompt == m.query and i.response == m.choices[m.gold]
        assert t.text == f"{m.query} {m.choices[m.gold]}"
        assert m.id == i.id == t.id


def test_gsm8k_views(shared_data_dir):
    (instruction,) = load_dataset("gsm8k", split="test", data_dir=shared_data_dir, limit=1)
    (text,) = load_dataset("gsm8k", "text", "test", data_dir=shared_data_dir, limit=1)
    assert instruction.prompt.startswith("Janet")
    assert instruction.response.endswith("#### 18")
    assert text.text == f"{instruction.prompt}\n{instruction.response}"


def test_pubmedqa_splits_follow_the_official_test_set(shared_data_dir):
    folder = shared_data_dir / "medical" / "pubmedqa"
    articles = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
    truth = json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8"))
    test = load_dataset("pubmedqa", "multiple_choice", "test", data_dir=shared_data_dir)
    train = load_dataset("pubmedqa", "multiple_choice", "train", data_dir=shared_data_dir)
    assert [r.meta["pmid"] for r in test] == [pmid for pmid in articles if pmid in truth]
    assert [r.meta["pmid"] for r in train] == [pmid for pmid in articles if pmid not in truth]
    assert all(r.choices[r.gold] == truth[r.meta["pmid"]] for r in test)
    first = articles[train[0].meta["pmid"]]
    abstract = "\n".join(first["CONTEXTS"])
    assert train[0].query == f"Abstract: {abstract}\nQuestion: {first['QUESTION']}\nAnswer:"
    (text,) = load_dataset("pubmedqa", data_dir=shared_data_dir, limit=1)
    assert text.text == f"{abstract}\n{first['LONG_ANSWER']}"


def test_medical_instruction_lists_lettered_options(shared_data_dir):
    (record,) = load_dataset("medexqa", "instruction", data_dir=shared_data_dir, limit=1)
    assert "\nA. X-ray\nB. Microwave\nC. Ultraviolet\nD. Infrared" in record.prompt
    assert record.response == "D. Infrared"
    (text,) = load_dataset("medexqa", "text", data_dir=shared_data_dir, limit=1)
    assert text.text.endswith("thermographic camera? Infrared")


def test_financial_phrasebank_decodes_non_ascii_rows(shared_data_dir):
    records = load_dataset("financial_phrasebank", "text", data_dir=shared_data_dir)
    assert sum(any(ord(ch) > 127 for ch in r.text) for r in records) >= 1


def test_finlora_label_sets_and_inputs(shared_data_dir):
    (nwgi,) = load_dataset("nwgi", data_dir=shared_data_dir, limit=1)
    assert len(nwgi.choices) == 7 and nwgi.choices[nwgi.gold] == "mildly positive"
    assert nwgi.query.endswith("\nAnswer:")
    (text,) = load_dataset("fiqa", "text", data_dir=shared_data_dir, limit=1)
    assert (
        text.text == "$BBRY Actually lost .03c per share if U incl VZ as no debt and 3.1 in Cash."
    )


def test_fewshot_labels_follow_first_appearance_in_0_42_train(shared_data_dir):
    for name, (folder, _, labels) in builtin.FEWSHOT_TASKS.items():
        seen: list[str] = []
        path = shared_data_dir / "cl" / "fewshot" / folder / "0_42" / "train.txt"
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                label = line.rsplit("\t", 1)[1]
                seen += [] if label in seen else [label]
        assert tuple(seen) == labels, name
    (record,) = load_dataset("fewshot_amazon", data_dir=shared_data_dir, limit=1)
    assert record.query.startswith("What is the sentiment of the following paragraph? ")
    (instruction,) = load_dataset(
        "fewshot_amazon", "instruction", data_dir=shared_data_dir, limit=1
    )
    assert instruction.prompt == record.query.removesuffix("\nAnswer:")


def test_olora_choices_come_from_labels_json(shared_data_dir):
    for name, folder in builtin.OLORA_TASKS.items():
        labels = json.loads((shared_data_dir / "cl" / "olora" / folder / "labels.json").read_text())
        (record,) = load_dataset(name, split="test", data_dir=shared_data_dir, limit=1)
        assert record.choices == tuple(labels)
        assert record.query.endswith(f"\nOptions: {', '.join(labels)}\nAnswer:")


def test_limit_takes_the_first_records_in_file_order(shared_data_dir):
    every = load_dataset("arc_challenge", data_dir=shared_data_dir)
    assert load_dataset("arc_challenge", data_dir=shared_data_dir, limit=5) == every[:5]
    assert load_dataset("arc_challenge", data_dir=shared_data_dir, limit=0) == []
    with pytest.raises(ForgetlessError, match="limit"):
        load_dataset("arc_challenge", data_dir=shared_data_dir, limit=-1)


# --- errors ----------------------------------------------------------------------------------


def _single_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_data_set_lists_known_ones():
    with pytest.raises(ForgetlessError) as error:
        load_dataset("nope")
    assert _single_line(error).startswith(
        "unknown data set 'nope'; known: alpaca_sample, arc_challenge, "
    )
    with pytest.raises(ForgetlessError, match="unknown data set or missing file 'nope'"):
        load_records("nope")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            {"name": "c4", "kind": "multiple_choice"},
            "no kind 'multiple_choice'; choose one of: text",
        ),
        ({"name": "gsm8k", "split": "valid"}, "no split 'valid'; choose one of: train, test"),
        ({"name": "fewshot_agnews", "subset": "9"}, "no subset '9'; choose one of: 0_42, 1_142"),
        ({"name": "arc_easy", "subset": "0_42"}, "has no subsets"),
    ],
)
def test_invalid_choices_list_the_valid_ones(arguments, expected):
    with pytest.raises(ForgetlessError) as error:
        load_dataset(**arguments)
    assert expected in _single_line(error)


def test_columns_are_rejected_for_built_in_data_sets():
    with pytest.raises(ForgetlessError, match="columns apply to user files only"):
        load_records("arc_easy", columns={"query": "q"})


# --- file resolution, verification and download ----------------------------------------------

FAKE_RELPATH = "general/fake.jsonl"
FAKE_BYTES = b'{"text": "hello"}\n'


@pytest.fixture
def fake_source(monkeypatch) -> registry.SourceFile:
    """A registered file that needs no shared data: its digest is that of FAKE_BYTES."""
    source = registry.SourceFile(
        path=FAKE_RELPATH,
        source_repo="example/repo",
        commit="0" * 40,
        source_path="data/fake file.jsonl",
        license="MIT",
        bytes=len(FAKE_BYTES),
        sha256=hashlib.sha256(FAKE_BYTES).hexdigest(),
    )
    monkeypatch.setattr(registry, "sources", lambda: {FAKE_RELPATH: source})
    return source


def _put(root: Path, content: bytes = FAKE_BYTES) -> Path:
    path = root / FAKE_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_data_dir_argument_wins_over_environment(monkeypatch, tmp_path, fake_source):
    from_env, from_flag = _put(tmp_path / "env"), _put(tmp_path / "flag")
    monkeypatch.setenv("FORGETLESS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_file(FAKE_RELPATH) == from_env
    assert resolve_data_file(FAKE_RELPATH, tmp_path / "flag") == from_flag
    assert resolve_data_file(FAKE_RELPATH, str(tmp_path / "flag")) == from_flag


def test_user_cache_is_used_when_the_data_dir_lacks_the_file(monkeypatch, tmp_path, fake_source):
    cached = _put(registry.data_cache_dir())
    _put(tmp_path / "env")
    monkeypatch.setenv("FORGETLESS_DATA_DIR", str(tmp_path / "env"))
    # An explicit data dir replaces the environment's, so the env copy is not consulted.
    assert resolve_data_file(FAKE_RELPATH, tmp_path / "empty") == cached
    monkeypatch.setenv("FORGETLESS_DATA_DIR", str(tmp_path / "elsewhere"))
    assert resolve_data_file(FAKE_RELPATH) == cached


def test_corrupt_file_is_reported_with_both_digests(tmp_path, shared_data_dir):
    relpath = "general/arc_challenge.jsonl"
    copy = tmp_path / "data" / relpath
    copy.parent.mkdir(parents=True)
    shutil.copyfile(shared_data_dir / relpath, copy)
    assert resolve_data_file(relpath, tmp_path / "data") == copy
    with copy.open("ab") as handle:
        handle.write(b"\n")  # changes size and mtime, so the memoised verdict no longer applies
    with pytest.raises(ForgetlessError) as error:
        load_dataset("arc_challenge", data_dir=tmp_path / "data")
    message = _single_line(error)
    expected = registry.sources()[relpath].sha256
    actual = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert str(copy) in message and expected in message and actual in message


def test_digest_is_checked_once_per_file_version(monkeypatch, tmp_path, fake_source):
    path = _put(tmp_path / "data")
    calls = []
    real = registry.read_sha256
    monkeypatch.setattr(registry, "read_sha256", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        resolve_data_file(FAKE_RELPATH, tmp_path / "data")
    assert len(calls) == 1
    path.write_bytes(b'{"text": "tampered"}\n')
    with pytest.raises(ForgetlessError, match="sha256"):
        resolve_data_file(FAKE_RELPATH, tmp_path / "data")


def test_download_lands_in_cache_atomically(monkeypatch, tmp_path, fake_source):
    target = registry.data_cache_dir() / FAKE_RELPATH
    seen = []

    def fake_download(url, destination):
        # The download goes to a temp file beside the target, never to the target itself.
        assert destination.parent == target.parent and destination != target
        assert not target.exists()
        seen.append(url)
        destination.write_bytes(FAKE_BYTES)

    monkeypatch.setattr(registry, "download_file", fake_download)
    assert resolve_data_file(FAKE_RELPATH, tmp_path / "empty") == target
    assert target.read_bytes() == FAKE_BYTES
    assert seen == [
        "https://raw.githubusercontent.com/example/repo/" + "0" * 40 + "/data/fake%20file.jsonl"
    ]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert resolve_data_file(FAKE_RELPATH) == target
    assert len(seen) == 1  # the second call finds the cached copy


def test_download_of_real_data_set_via_copy(monkeypatch, shared_data_dir):
    relpath = "general/openbook_qa.jsonl"
    url = registry.sources()[relpath].url
    monkeypatch.setattr(
        registry,
        "download_file",
        lambda u, destination: shutil.copyfile(shared_data_dir / relpath, destination),
    )
    records = load_dataset("openbook_qa")
    assert len(records) == EXPECTED_COUNTS[("openbook_qa", "test")]
    assert (registry.data_cache_dir() / relpath).is_file()
    assert url.endswith("/scripts/eval/local_data/commonsense_reasoning/openbook_qa.jsonl")


def test_download_with_wrong_bytes_leaves_nothing_behind(monkeypatch, tmp_path, fake_source):
    monkeypatch.setattr(registry, "download_file", lambda url, d: d.write_bytes(b"oops"))
    with pytest.raises(ForgetlessError) as error:
        resolve_data_file(FAKE_RELPATH)
    assert fake_source.sha256 in _single_line(error)
    folder = registry.data_cache_dir() / "general"
    assert list(folder.iterdir()) == []


def test_failed_download_says_where_it_looked(monkeypatch, tmp_path, fake_source):
    def offline(url, destination):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(registry, "download_file", offline)
    with pytest.raises(ForgetlessError) as error:
        resolve_data_file(FAKE_RELPATH, tmp_path / "mydata")
    message = _single_line(error)
    for part in (
        FAKE_RELPATH,
        str(tmp_path / "mydata"),
        str(registry.data_cache_dir()),
        fake_source.url,
        "--data-dir",
        "FORGETLESS_DATA_DIR",
        "Temporary failure in name resolution",
    ):
        assert part in message
    assert list((registry.data_cache_dir() / "general").iterdir()) == []


def test_unregistered_file_is_an_error(fake_source):
    with pytest.raises(ForgetlessError, match="not a registered data file"):
        resolve_data_file("general/other.jsonl")
