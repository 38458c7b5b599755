"""The stage engine: caching, interrupted stages, plans that share stages, and resuming an
interrupted training run."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from forgetless.data.config import DataConfig
from forgetless.data.records import TextRecord
from forgetless.digests import content_sha256
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.model_config import ModelConfig
from forgetless.models import load_model
from forgetless.report.stages import ReportStage
from forgetless.runs import STAGE_RECORD, RunDirectory, Stage, StageSettings
from forgetless.schema import identity_dump
from forgetless.train.config import TrainConfig
from forgetless.train.sft import train_model
from forgetless.train.stages import TrainStage


class CountingSettings(StageSettings):
    value: int


class CountingStage(Stage):
    """Writes a file per call; optionally crashes after writing, like a killed process."""

    def __init__(self, name, value, depends_on=(), crash=False):
        self.name, self.value, self.depends_on, self.crash = name, value, depends_on, crash
        self.calls = 0

    def settings(self):
        return CountingSettings(value=self.value)

    def run(self, workdir, inputs):
        self.calls += 1
        attempt = len(list(workdir.glob("attempt-*"))) + 1
        (workdir / f"attempt-{attempt}").write_text("x")
        previous = sorted(path.name for path in workdir.glob("attempt-*"))
        if self.crash:
            raise RuntimeError("killed")
        return {"value": self.value, "seen": previous}


def test_finished_stages_are_cached_and_downstream_follows_changes(tmp_path):
    run_dir = RunDirectory(tmp_path)
    first = CountingStage("a", 1)
    second = CountingStage("b", 2, depends_on=("a",))
    results = run_dir.run_all([first, second])
    assert not results["a"].cached and not results["b"].cached
    record = json.loads((tmp_path / "a" / STAGE_RECORD).read_text())
    assert record["summary"] == {"value": 1, "seen": ["attempt-1"]}

    again = run_dir.run_all([CountingStage("a", 1), CountingStage("b", 2, depends_on=("a",))])
    assert again["a"].cached and again["b"].cached

    changed_b = CountingStage("b", 2, depends_on=("a",))
    changed = run_dir.run_all([CountingStage("a", 99), changed_b])
    assert not changed["a"].cached and not changed["b"].cached
    assert changed["b"].fingerprint != results["b"].fingerprint
    assert changed_b.calls == 1


def test_plans_share_identical_stages_and_separate_differing_ones(tmp_path):
    def plan(value):
        return [CountingStage("base", 1), CountingStage("train", value, depends_on=("base",))]

    plans = {"a": plan(2), "b": plan(3), "c": plan(2)}
    results = RunDirectory(tmp_path).run_plans(plans)
    assert sum(stage.calls for stages in plans.values() for stage in stages) == 3
    assert results["a"]["base"].directory == tmp_path / "base"
    assert results["a"]["train"].directory == tmp_path / "a" / "train"
    assert results["b"]["train"].directory == tmp_path / "b" / "train"
    assert results["c"]["train"] == results["a"]["train"]
    again = {"a": plan(2), "b": plan(3), "c": plan(2)}
    rerun = RunDirectory(tmp_path).run_plans(again)
    assert all(result.cached for results in rerun.values() for result in results.values())
    assert sum(stage.calls for stages in again.values() for stage in stages) == 0


class ModelStage(CountingStage):
    """A stage whose folder is too large for the archive (a model)."""

    def run(self, workdir, inputs):
        summary = super().run(workdir, inputs)
        (workdir / "weights.bin").write_bytes(bytes(8192))
        return summary


def _experiment(train_value=2, eval_value=3):
    """base eval, train (large), eval of the trained model, report: an arm of a comparison."""
    return [
        CountingStage("eval_base", 1),
        ModelStage("train", train_value),
        CountingStage("eval_adapted", eval_value, depends_on=("train",)),
        CountingStage("report", 4, depends_on=("eval_base", "eval_adapted")),
    ]


def _archived_run(root, archive):
    return RunDirectory(root, archive=archive, archive_max_mb=4096 / 2**20)


def test_the_archive_keeps_small_stages_whole_and_large_ones_as_their_record(tmp_path):
    archive = tmp_path / "archive"
    results = _archived_run(tmp_path / "run", archive).run_all(_experiment())
    for name in ("eval_base", "eval_adapted", "report"):
        kept = archive / results[name].fingerprint
        assert sorted(p.name for p in kept.iterdir()) == ["attempt-1", STAGE_RECORD]
        assert (kept / STAGE_RECORD).read_bytes() == (
            results[name].directory / STAGE_RECORD
        ).read_bytes()
    model = archive / results["train"].fingerprint
    assert sorted(p.name for p in model.iterdir()) == ["RECORD_ONLY", STAGE_RECORD]


def test_a_finished_experiment_on_another_machine_reruns_nothing(tmp_path):
    archive = tmp_path / "archive"
    first = _archived_run(tmp_path / "machine1", archive).run_all(_experiment())
    stages = _experiment()
    events = []
    runs = RunDirectory(
        tmp_path / "machine2", archive=archive, archive_max_mb=4096 / 2**20,
        on_event=lambda event, info: events.append((event, info.name)),
    )  # fmt: skip
    again = runs.run_all(stages)
    assert sum(stage.calls for stage in stages) == 0
    assert ("archived", "train") in events
    # The small stages are restored as they were; the model is known by its summary only.
    for name in ("eval_base", "eval_adapted", "report"):
        assert again[name].artefacts and again[name].summary == first[name].summary
        assert (again[name].directory / "attempt-1").is_file()
    assert not again["train"].artefacts and not again["train"].directory.exists()
    assert again["train"].summary == first["train"].summary


def test_an_archived_model_reruns_when_a_stage_left_to_run_needs_it(tmp_path):
    archive = tmp_path / "archive"
    _archived_run(tmp_path / "machine1", archive).run_all(_experiment())
    # The adapted model's evaluation changed: it needs the model, which must train again.
    stages = _experiment(eval_value=30)
    again = _archived_run(tmp_path / "machine2", archive).run_all(stages)
    assert [stage.calls for stage in stages] == [0, 1, 1, 1]
    assert again["train"].artefacts and (again["train"].directory / "weights.bin").is_file()
    # keep: the caller wants the model's files whatever the archive holds.
    kept = _experiment()
    result = _archived_run(tmp_path / "machine3", archive).run_all(kept, keep=("train",))
    assert [stage.calls for stage in kept] == [0, 1, 0, 0]
    assert result["train"].artefacts


class SummaryReport(CountingStage):
    """A report of the training's summary: its model's files are never read."""

    def __init__(self, value):
        super().__init__("report", value, depends_on=("eval_adapted", "train"))
        self.summary_inputs = ("train",)

    def run(self, workdir, inputs):
        return {**super().run(workdir, inputs), "trained": inputs["train"].summary["value"]}


def test_a_report_of_the_training_summary_reruns_from_the_archived_record(tmp_path):
    archive = tmp_path / "archive"
    _archived_run(tmp_path / "machine1", archive).run_all([*_experiment()[:3], SummaryReport(4)])
    # A changed report on a machine with only the archive: the model is not retrained for it.
    stages = [*_experiment()[:3], SummaryReport(40)]
    again = _archived_run(tmp_path / "machine2", archive).run_all(stages)
    assert [stage.calls for stage in stages] == [0, 0, 0, 1]
    assert not again["train"].artefacts and again["report"].summary["trained"] == 2
    # A stage that reads the model's files still needs them.
    with pytest.raises(ValueError, match="not kept"):
        _archived_run(tmp_path / "machine2", archive).run(
            CountingStage("other", 5, depends_on=("train",)), {"train": again["train"]}
        )


def test_a_dry_run_plan_says_what_a_run_would_do_and_does_nothing(tmp_path):
    def states(runs, stages):
        return [(planned.folder, planned.state) for planned in runs.plan({"": stages})]

    archive = tmp_path / "archive"
    fresh = _experiment()
    assert states(_archived_run(tmp_path / "machine1", archive), fresh) == [
        ("eval_base", "to run"), ("train", "to run"), ("eval_adapted", "to run"),
        ("report", "to run"),
    ]  # fmt: skip
    assert not (tmp_path / "machine1").exists() and not archive.exists()
    _archived_run(tmp_path / "machine1", archive).run_all(_experiment())
    assert {state for _, state in states(_archived_run(tmp_path / "machine1", archive), fresh)} == {
        "finished"
    }
    # Another machine: the small stages come from the archive, the model stays a record...
    assert states(_archived_run(tmp_path / "machine2", archive), _experiment()) == [
        ("eval_base", "in archive"), ("train", "archived record"),
        ("eval_adapted", "in archive"), ("report", "in archive"),
    ]  # fmt: skip
    # ...unless a stage left to run needs it, as run_all would decide.
    changed = _experiment(eval_value=30)
    assert states(_archived_run(tmp_path / "machine2", archive), changed) == [
        ("eval_base", "in archive"), ("train", "to run"), ("eval_adapted", "to run"),
        ("report", "to run"),
    ]  # fmt: skip
    assert not (tmp_path / "machine2").exists()
    assert sum(stage.calls for stage in [*fresh, *changed]) == 0


def test_a_last_stage_is_never_left_as_a_record(tmp_path):
    archive = tmp_path / "archive"
    _archived_run(tmp_path / "machine1", archive).run_all([ModelStage("train", 2)])
    # Nothing consumes the model: its caller reads it, so it trains again.
    stage = ModelStage("train", 2)
    result = _archived_run(tmp_path / "machine2", archive).run_all([stage])["train"]
    assert stage.calls == 1 and result.artefacts


@pytest.mark.parametrize("damage", ["{not json", '{"fingerprint": "0000"}', "[]"])
def test_a_damaged_archive_record_is_one_line_naming_it(tmp_path, damage):
    archive = tmp_path / "archive"
    first = _archived_run(tmp_path / "machine1", archive).run_all(_experiment())
    record = archive / first["report"].fingerprint / STAGE_RECORD
    record.write_text(damage)
    with pytest.raises(ForgetlessError, match=f"{record}: not the record of stage"):
        _archived_run(tmp_path / "machine2", archive).run_all(_experiment())


def test_an_archived_record_cannot_feed_a_stage(tmp_path):
    archive = tmp_path / "archive"
    first = _archived_run(tmp_path / "machine1", archive).run_all(_experiment())
    runs = _archived_run(tmp_path / "machine2", archive)
    recorded = runs.run_all(_experiment())["train"]
    assert not recorded.artefacts
    with pytest.raises(ValueError, match="not kept"):
        runs.run(CountingStage("other", 5, depends_on=("train",)), {"train": recorded})
    assert first["train"].artefacts


def test_data_file_stage_fingerprint_follows_content_not_path(tmp_path):
    def stage_for(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return TrainStage("train_subset", ModelConfig(), TrainConfig(), data_file=path)

    original = stage_for(tmp_path / "run" / "selected.jsonl", '{"text": "a"}\n')
    moved = stage_for(tmp_path / "copy" / "selected.jsonl", '{"text": "a"}\n')
    edited = stage_for(tmp_path / "edit" / "selected.jsonl", '{"text": "b"}\n')
    assert moved.fingerprint({}) == original.fingerprint({})
    assert edited.fingerprint({}) != original.fingerprint({})


def _train_on_source(source: str) -> TrainStage:
    return TrainStage("train", ModelConfig(), TrainConfig(), data=DataConfig(source=source))


def test_a_local_data_source_is_identified_by_its_content_not_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.jsonl").write_text('{"text": "a"}\n')
    Path("moved").mkdir()
    Path("moved/mine.jsonl").write_text('{"text": "a"}\n')
    original = _train_on_source("mine.jsonl").fingerprint({})
    assert _train_on_source(str(tmp_path / "moved/mine.jsonl")).fingerprint({}) == original
    # The report that names the data follows it too, so a moved run keeps its reports.
    reports = [
        ReportStage("report", [], ["c4"], base="b", adapted="a", meta={"data": path, "steps": 2})
        for path in ("mine.jsonl", str(tmp_path / "moved/mine.jsonl"))
    ]
    inputs = {"b": "0", "a": "1"}
    assert reports[0].fingerprint(inputs) == reports[1].fingerprint(inputs)
    # An edited file is other data: its cached training must not be reused.
    Path("mine.jsonl").write_text('{"text": "b"}\n')
    assert _train_on_source("mine.jsonl").fingerprint({}) != original


def test_an_unreadable_local_source_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("locked.jsonl").write_text('{"text": "a"}\n')

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ForgetlessError, match="^cannot read .*locked.jsonl: Permission denied$"):
        _train_on_source("locked.jsonl").fingerprint({})


def test_large_files_are_read_once_across_commands(tmp_path, monkeypatch):
    from forgetless import digests

    monkeypatch.setenv("FORGETLESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "LARGE_FILE_BYTES", 4)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    first = digests.file_sha256(weights)
    assert first == hashlib.sha256(b"weights").hexdigest()
    reads = []
    monkeypatch.setattr(digests, "read_sha256", lambda path: reads.append(path) or "fresh")
    assert digests.file_sha256(weights) == first and not reads  # from the user cache
    weights.write_bytes(b"retrained")  # another size: read again
    assert digests.file_sha256(weights) == "fresh" and reads == [weights]
    (tmp_path / "cache" / digests.DIGEST_CACHE).write_text("{damaged")
    assert digests.file_sha256(weights) == "fresh"  # a damaged cache is only recomputed


def test_names_of_no_local_path_keep_their_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = _train_on_source("pubmedqa").settings()
    for section in (settings.model, settings.data):
        assert identity_dump(section) == section.model_dump(mode="json")
    tasks = ["c4", "ppl:pubmedqa@test", "owner/name"]
    assert identity_dump(EvalConfig(general_tasks=tasks))["general_tasks"] == tasks


def test_a_local_task_file_keeps_its_metric_and_split_in_the_identity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.jsonl").write_text('{"text": "a"}\n')
    dumped = identity_dump(EvalConfig(general_tasks=["ppl:notes.jsonl@test", "notes.jsonl"]))
    digest = content_sha256("notes.jsonl")
    assert dumped["general_tasks"] == [f"ppl:sha256:{digest}@test", f"sha256:{digest}"]


def test_a_local_checkpoint_is_identified_by_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = Path("ckpt")
    (checkpoint / ".cache").mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights")

    def identity():
        return identity_dump(ModelConfig(name="./ckpt"))["name"]

    before = identity()
    assert before.startswith("sha256:")
    (checkpoint / ".cache" / "download.lock").write_text("x")  # not the model
    (checkpoint / "checkpoint-10").mkdir()  # a trainer's, which from_pretrained never reads
    (checkpoint / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    assert identity() == before
    (checkpoint / "model.safetensors").write_bytes(b"retrained")
    assert identity() != before


def test_interrupted_stage_resumes_in_its_partial_directory(tmp_path):
    run_dir = RunDirectory(tmp_path)
    with pytest.raises(RuntimeError):
        run_dir.run(CountingStage("a", 1, crash=True), {})
    assert not (tmp_path / "a").exists()  # nothing half-finished looks finished
    partials = list(tmp_path.glob("a.partial-*"))
    assert len(partials) == 1 and (partials[0] / "attempt-1").exists()

    result = run_dir.run(CountingStage("a", 1), {})
    assert result.summary["seen"] == ["attempt-1", "attempt-2"]  # the crashed attempt's work
    assert (tmp_path / "a" / "attempt-1").exists()
    assert not list(tmp_path.glob("a.partial-*"))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _records():
    return [TextRecord(f"document {i}: " + "the quick brown fox " * (i % 5 + 2)) for i in range(40)]


def _config():
    return TrainConfig(
        method="full", learning_rate=1e-3, max_steps=6, batch_size=4, max_length=32, save_steps=2
    )


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    reference = load_model("tiny-llama", device="cpu")
    ref_model, ref_result = train_model(
        reference.model,
        reference.tokenizer,
        _records(),
        _config(),
        tmp_path / "ref",
        progress=False,
    )
    assert ref_result.resumed_from is None and ref_result.steps == 6

    interrupted = load_model("tiny-llama", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train_model(
            interrupted.model,
            interrupted.tokenizer,
            _records(),
            _config(),
            tmp_path / "run",
            callbacks=[StopAt(3)],
            progress=False,
        )
    assert not (tmp_path / "run" / "model").exists()
    totals = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "forgetless_totals.json"
    before = json.loads(totals.read_text())
    resumed = load_model("tiny-llama", device="cpu")
    model, result = train_model(
        resumed.model, resumed.tokenizer, _records(), _config(), tmp_path / "run", progress=False
    )
    assert result.resumed_from is not None and Path(result.resumed_from).name == "checkpoint-2"
    assert result.steps == 6
    # The summary covers the whole run, the part before the interruption included.
    assert result.input_tokens_seen == ref_result.input_tokens_seen
    assert result.train_loss == pytest.approx(ref_result.train_loss, rel=1e-4)
    assert result.seconds > before["seconds"] > 0
    for (name, expected), actual in zip(
        ref_model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, msg=name, rtol=1e-5, atol=1e-6)
    saved = list((tmp_path / "run" / "model").glob("*.safetensors"))
    assert saved, "the final model is written as safetensors"
    reloaded = load_model(str(tmp_path / "run" / "model"), device="cpu")
    torch.testing.assert_close(
        reloaded.model.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"]
    )


def test_lora_training_writes_adapter_and_merged_checkpoint(tmp_path):
    base = load_model("tiny-llama", device="cpu")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    config = _config().model_copy(update={"method": "lora", "max_steps": 3})
    model, result = train_model(
        base.model, base.tokenizer, _records(), config, tmp_path, progress=False
    )
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in key for key in model.state_dict())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in key for key in changed)
    assert result.method == "lora"


def test_resuming_with_other_settings_is_refused(tmp_path):
    first = load_model("tiny-llama", device="cpu")
    config = _config().model_copy(update={"max_steps": 2})
    train_model(first.model, first.tokenizer, _records(), config, tmp_path, progress=False)
    again = load_model("tiny-llama", device="cpu")
    changed = config.model_copy(update={"learning_rate": 5e-3})
    with pytest.raises(ForgetlessError, match="another training run.*learning_rate"):
        train_model(again.model, again.tokenizer, _records(), changed, tmp_path, progress=False)
    with pytest.raises(ForgetlessError, match=r"another training run \(changed: data"):
        train_model(again.model, again.tokenizer, _records()[:8], config, tmp_path, progress=False)
    other = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    with pytest.raises(ForgetlessError, match=r"another training run \(changed: model"):
        train_model(other.model, other.tokenizer, _records(), config, tmp_path, progress=False)


def test_a_finished_run_called_again_changes_nothing(tmp_path):
    first = load_model("tiny-llama", device="cpu")
    config = _config().model_copy(update={"max_steps": 2})
    _, result = train_model(
        first.model, first.tokenizer, _records(), config, tmp_path, progress=False
    )
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    again = load_model("tiny-llama", device="cpu")
    model, rerun = train_model(
        again.model, again.tokenizer, _records(), config, tmp_path, progress=False
    )
    assert rerun == result and rerun.steps == 2
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    saved = load_model(str(tmp_path / "model"), device="cpu").model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], msg=name)


def test_a_diverging_run_stops_at_the_step_it_diverged(tmp_path):
    loaded = load_model("tiny-llama", device="cpu")
    config = _config().model_copy(update={"learning_rate": 1e30, "max_grad_norm": 1e30})
    with pytest.raises(
        ForgetlessError, match=r"training diverged at step \d+: .* no longer finite"
    ):
        train_model(loaded.model, loaded.tokenizer, _records(), config, tmp_path, progress=False)
    assert not (tmp_path / "model").exists()


def test_a_setting_added_later_keeps_old_fingerprints_when_off():
    from pydantic import Field

    from forgetless.schema import Section, added_setting

    class Before(Section):
        rounds: int = 3

    class After(Section):
        rounds: int = 3
        checks: int = Field(2, json_schema_extra=added_setting(0))

    assert identity_dump(After(checks=0)) == identity_dump(Before())
    assert identity_dump(After()) == {"rounds": 3, "checks": 2}
