"""Hub data set ids, read offline from a local `datasets` cache laid out as a download leaves it."""

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest

from forgetless.data import ChatRecord, TextRecord, is_hub_id, load_records, load_section
from forgetless.data.config import DataConfig
from forgetless.errors import ForgetlessError

CHAT_ID = "forgetless-test/tiny_chat"
TEXT_ID = "forgetless-test/tiny_text"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _conversation(index: int) -> list[dict]:
    return [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": f"Question {index}?"},
        {"role": "assistant", "content": f"Answer{index}."},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Same."},
    ]


def cache_hub_dataset(
    cache: Path, repo_id: str, splits: dict[str, list[dict]], config: str = "default"
) -> Path:
    """Write what `datasets` keeps after downloading ``repo_id`` at commit COMMIT.

    A download leaves ``<owner>___<name>/<config>/<version>/<commit>/`` holding
    ``dataset_info.json`` and ``<name>-<split>.arrow``; offline, `load_dataset` finds it
    there (datasets' CachedDatasetModuleFactory and packaged ``cache`` builder). The same
    packaged builder a download uses prepares it here from local files instead of hub URLs.
    """
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    staging = cache.parent / f"staging-{owner}-{name}-{config}"
    staging.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(staging / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    builder = Json(
        cache_dir=str(staging / "build"),
        dataset_name=name,
        data_files=files,
        hash=COMMIT,
        config_name=config,
        config_id=config,
    )
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / config / str(builder.config.version) / COMMIT
    shutil.copytree(builder.cache_dir, target, ignore=shutil.ignore_patterns("*.lock"))
    shutil.rmtree(staging)
    return target


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline session whose datasets cache holds the chat and text test data sets."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    chats = {"train": [{"messages": _conversation(i)} for i in range(6)]}
    chats["test"] = [{"messages": _conversation(9)}]
    cache_hub_dataset(cache, CHAT_ID, chats)
    cache_hub_dataset(cache, TEXT_ID, {"train": [{"body": "plain", "uid": 7}]})
    cache_hub_dataset(cache, TEXT_ID, {"train": [{"body": "other config"}]}, config="other")
    return cache


def _error(source: str, **options) -> str:
    with pytest.raises(ForgetlessError) as error:
        load_records(source, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("HuggingFaceH4/ultrachat_200k", True),
        ("owner/name-v1.5", True),
        ("ultrachat_200k", False),  # bare names stay registered names or errors
        ("./owner/name", False),
        ("/owner/name", False),
        ("~/name", False),
        ("a/b/c", False),
        ("data/train.jsonl", False),
        ("owner/notes.xml", False),
        ("-owner/name", False),
    ],
)
def test_hub_id_rule(source, expected):
    assert is_hub_id(source) is expected


def test_cached_chat_data_set_loads_offline_as_chat(hub_cache):
    records = load_records(CHAT_ID)
    assert len(records) == 6 and all(isinstance(record, ChatRecord) for record in records)
    assert records[2].messages[2].content == "Answer2."
    assert [record.id for record in records[:2]] == [f"{CHAT_ID}/train/0", f"{CHAT_ID}/train/1"]
    (test,) = load_records(CHAT_ID, split="test")
    assert test.messages[1].content == "Question 9?" and test.id == f"{CHAT_ID}/test/0"
    assert len(load_records(CHAT_ID, limit=2)) == 2


def test_columns_subset_and_revision(hub_cache):
    (record,) = load_records(TEXT_ID, subset="default", columns={"text": "body", "id": "uid"})
    assert record == TextRecord("plain", id="7")
    (other,) = load_records(TEXT_ID, subset="other", columns={"text": "body"}, revision=COMMIT)
    assert other == TextRecord("other config", id=f"{TEXT_ID}/other/train/0")
    # Rows go through the same validation as files, located by split and row.
    assert _error(TEXT_ID, subset="default") == (
        f"{TEXT_ID}:default[train] row 0: missing column 'text'; available: body, uid"
    )
    assert "multiple 'forgetless-test/tiny_text' configurations" in _error(TEXT_ID)
    assert "Unknown split \"validation\". Should be one of ['train', 'test']" in _error(
        CHAT_ID, split="validation"
    )


def test_offline_revision_must_be_the_cached_commit(hub_cache):
    assert _error(CHAT_ID, revision="v2.0") == (
        f"hub data set '{CHAT_ID}': revision 'v2.0' is not the cached copy (commit {COMMIT}) "
        "and offline mode is on; give the cached commit or go online"
    )


def test_uncached_data_set_offline_is_one_clear_line(hub_cache):
    message = _error("forgetless-test/not_cached")
    assert message.startswith(
        f"hub data set 'forgetless-test/not_cached' is not in the local datasets cache "
        f"({hub_cache}, set by $HF_DATASETS_CACHE) and offline mode is on"
    )


def test_unreachable_hub_online_is_one_clear_line(hub_cache, monkeypatch):
    def unreachable(path, **options):
        # What datasets raises when the hub cannot be reached and nothing is cached.
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    assert _error("forgetless-test/not_cached") == (
        "cannot reach the Hugging Face Hub for data set 'forgetless-test/not_cached' and it is "
        f"not in the local datasets cache ({hub_cache}): Couldn't reach "
        "'forgetless-test/not_cached' on the Hub (LocalEntryNotFoundError)"
    )


def test_local_paths_win_and_path_typos_never_reach_the_hub(hub_cache, tmp_path, monkeypatch):
    def no_hub(*args, **options):
        raise AssertionError("the hub was tried")

    monkeypatch.setattr(datasets, "load_dataset_builder", no_hub)
    monkeypatch.chdir(tmp_path)
    for typo in ("./data/x.jsonl", "data/x.jsonl", "owner/name.csv", "x.parquet"):
        assert f"data file not found: {Path(typo)}" in _error(typo)
    # A local folder spelled like a hub id is read as the folder.
    local = Path(CHAT_ID)
    datasets.Dataset.from_list([{"text": "local copy"}]).save_to_disk(str(local))
    assert load_records(CHAT_ID) == [TextRecord("local copy", id="tiny_chat/0")]
    assert "unknown data set or missing file 'nope'" in _error("nope")


def test_revision_is_for_hub_data_sets_only(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n')
    assert "revision applies to hub data sets only" in _error(str(path), revision="main")
    assert "revision applies to hub data sets only" in _error("arc_easy", revision="main")


def test_a_data_section_names_a_hub_id(hub_cache):
    records = load_section(DataConfig(source=CHAT_ID, revision=COMMIT, limit=4))
    assert len(records) == 4 and all(isinstance(record, ChatRecord) for record in records)


def test_train_command_reads_a_hub_id(hub_cache, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("FORGETLESS_CACHE_DIR", str(tmp_path / "forgetless-cache"))
    base = ["train", "--model", "tiny-llama", "--max-steps", "2", "--max-length", "96"]
    pinned = ["--set", f"data.revision={COMMIT}", "--json"]
    code, out, err = run_cli(
        [*base, "--output-dir", str(tmp_path / "a"), "--data", CHAT_ID, *pinned]
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["records"] == 6 and summary["steps"] == 2
    assert math.isfinite(summary["train_loss"])
    assert (tmp_path / "a" / "model" / "config.json").is_file()
    missing = "forgetless-test/not_cached"
    code, _, err = run_cli([*base, "--output-dir", str(tmp_path / "b"), "--data", missing])
    assert code == 2
    assert f"hub data set '{missing}' is not in the local datasets cache" in err
    assert "Traceback" not in err
