"""Model cards and --push-to-hub on the tiny model: every model folder forgetless writes has a
card with its run's facts, a recipe's final model gets its retention table, cards survive
reruns byte for byte, and a push that cannot happen fails before any work."""

from __future__ import annotations

import json
import time

import pytest
import torch
from huggingface_hub import ModelCard, RepoUrl, constants

from forgetless import hub
from forgetless.cards import CARD_FILE, NOT_EVALUATED, set_retention
from forgetless.config import validate_config
from forgetless.data import load_section
from forgetless.data.config import DataConfig
from forgetless.errors import ForgetlessError
from forgetless.merge import merge_checkpoints
from forgetless.merge.config import MergeConfig
from forgetless.model_config import ModelConfig
from forgetless.recipes.adapt import run_adapt
from forgetless.train.config import TrainConfig
from forgetless.train.sft import RUN_RECORD
from forgetless.train.stages import TrainSettings, train_into

DATA = DataConfig(source="pubmedqa", kind="text", split="train", limit=24)
TRAIN = {"max_steps": 2, "batch_size": 2, "max_length": 32, "save_steps": 2}
# The measured lines of the compute section: the only ones two separate runs may differ in.
MEASURED = ("| wall time |", "| peak ")


def _settings(**train) -> TrainSettings:
    return TrainSettings(
        model=ModelConfig(name="tiny-llama"),
        data=DATA,
        data_file=None,
        train=TrainConfig(**{**TRAIN, **train}),
    )


def _train(output, shared_data_dir, **kwargs) -> dict:
    records = load_section(DATA, str(shared_data_dir))
    return train_into(_settings(method="lora"), records, output, str(shared_data_dir), **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data_dir):
    output = tmp_path_factory.mktemp("cards") / "train"
    _train(output, shared_data_dir)
    return output


def _unmeasured(card: str) -> list[str]:
    return [line for line in card.splitlines() if not line.startswith(MEASURED)]


def test_a_trained_model_has_a_card_with_its_run(trained):
    card = (trained / "model" / CARD_FILE).read_text()
    record = json.loads((trained / RUN_RECORD).read_text())
    metadata = ModelCard(card).data
    assert metadata.tags == ["forgetless", "lora"]
    assert metadata.library_name == "transformers"
    assert metadata.base_model is None  # an alias is no hub id
    assert "`tiny-llama`" in card.split("## Base model")[1]
    data = card.split("## Training data")[1].split("##")[0]
    assert "| source | pubmedqa |" in data and "| split | train |" in data
    assert f"| fingerprint | {record['identity']['data']} |" in data
    settings = card.split("## Method and settings")[1].split("##")[0]
    assert "| learning_rate | 0.0001 |" in settings and "| lora.r | 16 |" in settings
    assert "osft." not in settings  # only the method's own section
    compute = card.split("## Compute")[1].split("##")[0]
    result = record["result"]
    assert f"| optimizer steps | {result['steps']} |" in compute
    assert f"| tokens trained on | {result['input_tokens_seen']} |" in compute
    device = "| device | cuda (" if torch.cuda.is_available() else "| device | cpu |"
    assert device in compute and "MiB |" in compute
    assert NOT_EVALUATED in card
    assert str(trained) not in card  # no path of this run's folders


def test_cards_are_deterministic(trained, tmp_path, shared_data_dir):
    card_file = trained / "model" / CARD_FILE
    before = (card_file.read_bytes(), card_file.stat().st_mtime_ns)
    _train(trained, shared_data_dir)  # finished: nothing is rewritten
    assert (card_file.read_bytes(), card_file.stat().st_mtime_ns) == before
    _train(tmp_path / "again", shared_data_dir)
    again = (tmp_path / "again" / "model" / CARD_FILE).read_text()
    assert _unmeasured(again) == _unmeasured(before[0].decode())


def test_a_merge_has_a_card(trained, tmp_path):
    experts = [str(trained / "model")]
    output = tmp_path / "merged"
    report = merge_checkpoints("tiny-llama", experts, output, MergeConfig(keep=0.5), progress=False)
    card = (output / CARD_FILE).read_text()
    assert ModelCard(card).data.tags == ["forgetless", "sotu"]
    assert "# tiny-llama · sotu merge of 1 expert\n" in card
    row = next(line for line in card.splitlines() if experts[0] in line)
    norm, kept = report.overlap["delta_norm"][0], report.overlap["kept_fraction"][0]
    assert row.endswith(f"| {norm:.6g} | {kept:.6g} |")
    assert "| keep | 0.5 |" in card and "| seed | 0 |" in card
    collisions = report.overlap["collision_rate"]
    assert f"| collision rate (kept by two or more experts) | {collisions:.6g} |" in card
    assert NOT_EVALUATED in card
    first = (output / CARD_FILE).read_bytes()
    merge_checkpoints(
        "tiny-llama", experts, output, MergeConfig(keep=0.5), overwrite=True, progress=False
    )
    assert (output / CARD_FILE).read_bytes() == first


def _recipe(tmp_path):
    return validate_config(
        {
            "model": {"name": "tiny-llama"},
            "train": TRAIN,
            "evaluate": {
                "domain_tasks": ["ppl:pubmedqa@test"],
                "general_tasks": ["c4"],
                "limit": 4,
            },
            "data": DATA.model_dump(),
            "run_dir": str(tmp_path / "run"),
        }
    )


def test_a_recipes_model_card_holds_its_retention_table(tmp_path, shared_data_dir):
    config = _recipe(tmp_path)
    results = run_adapt(config, progress=False)
    card_file = results["train"].directory / "model" / CARD_FILE
    card = card_file.read_text()
    assert NOT_EVALUATED not in card
    retention = card.split("## Retention")[1].split("## How to load")[0]
    assert "recipe: train full; data: pubmedqa" in retention
    for group, task in (("domain", "ppl:pubmedqa@test"), ("general", "c4")):
        row = next(line for line in retention.splitlines() if line.startswith(f"| {group} "))
        assert f"| {task} | perplexity |" in row and "% perplexity [" in row
    assert "- mean domain change (positive = better):" in retention
    assert "| fingerprint | 24 records, sha256 " in card  # the training facts are kept
    before = (card_file.read_bytes(), card_file.stat().st_mtime_ns)
    rerun = run_adapt(config, progress=False)
    assert all(result.cached for result in rerun.values())
    assert (card_file.read_bytes(), card_file.stat().st_mtime_ns) == before
    assert not set_retention(card_file.parent, retention.strip())


def _online(monkeypatch, tmp_path, token: str | None = "hf_test"):
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(hub, "_checked", set())


def _push_targets(tmp_path, shared_data_dir):
    """Each API entry point called with push_to_hub, by command name."""
    config = _recipe(tmp_path)
    return {
        "train": (lambda: _train(tmp_path / "train", shared_data_dir, push_to_hub="me/tiny")),
        "merge": (
            lambda: merge_checkpoints(
                "tiny-llama", ["tiny-llama"], tmp_path / "merged", push_to_hub="me/tiny"
            )
        ),
        "run": (lambda: run_adapt(config, progress=False, push_to_hub="me/tiny")),
    }


@pytest.mark.parametrize("command", ["train", "merge", "run"])
def test_push_fails_offline_before_anything_is_written(
    command, monkeypatch, tmp_path, shared_data_dir
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ForgetlessError, match=r"--push-to-hub me/tiny: offline mode \(HF_HUB_OFF"):
        _push_targets(tmp_path, shared_data_dir)[command]()
    assert time.perf_counter() - started < 30  # no training, no merging
    assert {path.name for path in tmp_path.iterdir()} == set()


def test_push_fails_without_a_token_before_training(monkeypatch, tmp_path, shared_data_dir):
    _online(monkeypatch, tmp_path, token=None)
    with pytest.raises(ForgetlessError, match="--push-to-hub me/tiny: no Hugging Face token.*hf"):
        _push_targets(tmp_path, shared_data_dir)["train"]()
    assert not (tmp_path / "train").exists()


def test_push_fails_fast_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(ForgetlessError, match="--push-to-hub me/tiny: the Hub did not accept"):
        hub.check_push_access("me/tiny")
    assert time.perf_counter() - started < hub.PREFLIGHT_TIMEOUT_S + 5


def test_push_refuses_a_read_only_token(monkeypatch, tmp_path):
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(
        hub, "_whoami", lambda token: {"name": "me", "auth": {"accessToken": {"role": "read"}}}
    )
    with pytest.raises(ForgetlessError, match="read-only"):
        hub.check_push_access("me/tiny")


class FakeHfApi:
    """HfApi without a network: records what would be created and uploaded."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(path.name for path in folder_path.iterdir())
        card = (folder_path / CARD_FILE).read_text()
        self.calls.append(("upload_folder", repo_id, folder_path, files, card, kwargs))


def test_push_uploads_the_model_folder_with_its_card(monkeypatch, tmp_path, shared_data_dir):
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(hub, "_whoami", lambda token: {"auth": {"accessToken": {"role": "write"}}})
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    summary = _train(tmp_path / "train", shared_data_dir, push_to_hub="me/tiny", private=True)
    assert summary["hub_url"] == "https://huggingface.co/me/tiny"
    (_, repo, options), upload = FakeHfApi.calls
    assert repo == "me/tiny" and options["private"] is True and options["exist_ok"] is True
    _, repo, folder, files, card, options = upload
    assert repo == "me/tiny" and folder == tmp_path / "train" / "model"
    assert {CARD_FILE, "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert 'from_pretrained("me/tiny")' in card and "## Compute" in card
    assert "lora" in options["commit_message"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--push-to-hub", "me/tiny"], "--push-to-hub me/tiny: offline mode"),
        (["--private"], "--private applies to --push-to-hub REPO"),
    ],
)
def test_cli_push_mistakes_are_one_line_before_training(
    extra, message, monkeypatch, tmp_path, run_cli
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "a note"}\n')
    output = tmp_path / "out"
    argv = ["train", "--model", "tiny-llama", "--data", str(data), "--output-dir", str(output)]
    code, _, err = run_cli([*argv, *extra])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not output.exists()
