"""Stages, the run directory that caches them, and the adapt-and-report pipeline.

A stage declares its upstream stages and the configuration that determines its output; the
two give it a fingerprint. ``RunDirectory.run`` executes a stage in
``<run>/<stage>.partial-<fingerprint>/`` and, once it finished, renames that folder to
``<run>/<stage>/`` with a ``stage.json`` record, so:

* a finished stage with the same fingerprint is skipped on the next run (cached);
* a stage killed half-way leaves only its partial folder, which the next run with the same
  fingerprint reuses (training resumes from its last checkpoint there);
* a changed configuration changes the fingerprint of the stage and of everything downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from forgetless import __version__
from forgetless.config import ForgetlessConfig
from forgetless.errors import ForgetlessError

STAGE_RECORD = "stage.json"


@dataclass(frozen=True)
class StageResult:
    name: str
    fingerprint: str
    directory: Path
    summary: dict[str, Any]
    cached: bool


class Stage(ABC):
    """One step of a run. Subclasses write their artefacts into ``workdir`` only."""

    name: str = ""
    depends_on: tuple[str, ...] = ()

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything besides the upstream outputs that determines this stage's artefacts."""

    @abstractmethod
    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        """Produce the artefacts in ``workdir``; return a JSON-able summary."""

    def fingerprint(self, inputs: dict[str, StageResult]) -> str:
        payload = {
            # A new release may compute a stage differently, so it invalidates the cache.
            "forgetless": __version__,
            "stage": self.name,
            "settings": self.settings(),
            "inputs": {name: inputs[name].fingerprint for name in self.depends_on},
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temp file and a rename so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temp, path)


@dataclass
class RunDirectory:
    root: Path
    on_event: Callable[[str, StageResult | str], None] = field(default=lambda event, info: None)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def cached(self, stage: Stage, fingerprint: str) -> StageResult | None:
        record_file = self.root / stage.name / STAGE_RECORD
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text())
        if record.get("fingerprint") != fingerprint:
            return None
        return StageResult(stage.name, fingerprint, record_file.parent, record["summary"], True)

    def run(self, stage: Stage, inputs: dict[str, StageResult]) -> StageResult:
        missing = [name for name in stage.depends_on if name not in inputs]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing} to run first")
        fingerprint = stage.fingerprint(inputs)
        hit = self.cached(stage, fingerprint)
        if hit is not None:
            self.on_event("cached", hit)
            return hit
        self.on_event("start", stage.name)
        partial = self.root / f"{stage.name}.partial-{fingerprint}"
        partial.mkdir(parents=True, exist_ok=True)
        summary = stage.run(partial, inputs)
        record = {
            "stage": stage.name,
            "fingerprint": fingerprint,
            "inputs": {name: inputs[name].fingerprint for name in stage.depends_on},
            "settings": stage.settings(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summary": summary,
        }
        write_json_atomic(partial / STAGE_RECORD, record)
        final = self.root / stage.name
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for stale in self.root.glob(f"{stage.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        result = StageResult(stage.name, fingerprint, final, summary, False)
        self.on_event("done", result)
        return result

    def run_all(self, stages: Sequence[Stage]) -> dict[str, StageResult]:
        """Run stages in the given (topological) order, skipping those already finished."""
        results: dict[str, StageResult] = {}
        for stage in stages:
            results[stage.name] = self.run(stage, results)
        return results


# --- the adapt-and-report pipeline ------------------------------------------------------------


def _config_settings(config: ForgetlessConfig, *sections: str) -> dict[str, Any]:
    return {name: getattr(config, name).model_dump(mode="json") for name in sections}


def load_training_records(config: ForgetlessConfig) -> list:
    from forgetless.data import load_records

    data = config.data
    return load_records(
        data.source,
        kind=data.kind,
        split=data.split,
        subset=data.subset,
        data_dir=config.data_dir,
        columns=data.columns,
        limit=data.limit,
    )


def load_stage_model(config: ForgetlessConfig, inputs: dict[str, StageResult], model_from):
    """The configured base model, or the ``model/`` written by the upstream stage ``model_from``."""
    from forgetless.models import load_configured_model

    trained = None
    if model_from is not None:
        trained = str(inputs[model_from].directory / "model")
    return load_configured_model(config.model, name=trained)


class EvaluateStage(Stage):
    """Evaluate a model (the base, or the output of an upstream training stage)."""

    def __init__(self, name: str, config: ForgetlessConfig, model_from: str | None = None):
        self.name = name
        self.config = config
        self.model_from = model_from
        self.depends_on = (model_from,) if model_from else ()

    def tasks(self) -> list[str]:
        evaluate = self.config.evaluate
        return list(dict.fromkeys([*evaluate.domain_tasks, *evaluate.general_tasks]))

    def settings(self) -> dict[str, Any]:
        settings = _config_settings(self.config, "evaluate")
        if self.model_from is None:
            settings.update(_config_settings(self.config, "model"))
        return settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.evaluate.tasks import evaluate_tasks, load_tasks

        prepared = load_tasks(self.tasks(), self.config.evaluate, data_dir=self.config.data_dir)
        loaded = load_stage_model(self.config, inputs, self.model_from)
        results = evaluate_tasks(loaded.model, loaded.tokenizer, prepared, self.config.evaluate)
        metrics = {task: result.to_dict() for task, result in results.items()}
        write_json_atomic(workdir / "metrics.json", metrics)
        write_json_atomic(
            workdir / "items.json", {task: result.per_item for task, result in results.items()}
        )
        return {"metrics_file": "metrics.json", "items_file": "items.json", "tasks": list(metrics)}


class TrainStage(Stage):
    name = "train"

    def __init__(self, config: ForgetlessConfig):
        self.config = config

    def settings(self) -> dict[str, Any]:
        return _config_settings(self.config, "model", "data", "train")

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        summary = self.train_into(workdir)
        # Checkpoints exist only to resume an interrupted run; the finished stage keeps the
        # final model and drops them to save disk.
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        return summary

    def train_into(self, output_dir: Path) -> dict[str, Any]:
        """Load data and model, fine-tune, and write ``output_dir/model``; resumable."""
        from forgetless.models import load_configured_model
        from forgetless.train.sft import train_model

        records = load_training_records(self.config)
        loaded = load_configured_model(self.config.model, for_training=True)
        _, result = train_model(
            loaded.model,
            loaded.tokenizer,
            records,
            self.config.train,
            output_dir,
            data_dir=self.config.data_dir,
        )
        summary = result.to_dict()
        summary["model_dir"] = "model"
        summary["records"] = len(records)
        return summary


class DataFileTrainStage(TrainStage):
    """Fine-tuning on a data file written by an earlier step (a selection, a sampled
    mixture), read as text records in place of the config's data source; the file's content
    is part of the fingerprint, so a new file retrains."""

    def __init__(self, config: ForgetlessConfig, name: str, data_file: Path):
        data = config.data.model_copy(update={"source": str(data_file), "kind": "text"})
        super().__init__(config.model_copy(update={"data": data}))
        self.name = name
        self.digest = hashlib.sha256(Path(data_file).read_bytes()).hexdigest()

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        # The content hash identifies the data; keeping the file's path as well would make a
        # moved or copied run directory retrain every stage trained on such a file.
        del settings["data"]["source"]
        return {**settings, "data_sha256": self.digest}


class ReportStage(Stage):
    name = "report"

    def __init__(
        self, config: ForgetlessConfig, base: str = "eval_base", adapted: str = "eval_adapted"
    ):
        self.config = config
        self.base, self.adapted = base, adapted
        self.depends_on = (base, adapted)

    def settings(self) -> dict[str, Any]:
        evaluate = self.config.evaluate
        return {"domain": evaluate.domain_tasks, "general": evaluate.general_tasks}

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.report.retention import build_retention_report, write_report

        def metrics(stage: str) -> dict[str, Any]:
            return json.loads((inputs[stage].directory / "metrics.json").read_text())

        training = inputs.get("train")
        report = build_retention_report(
            base=metrics(self.base),
            adapted=metrics(self.adapted),
            domain_tasks=self.config.evaluate.domain_tasks,
            general_tasks=self.config.evaluate.general_tasks,
            meta={
                "model": self.config.model.name,
                "data": self.config.data.source,
                "method": self.config.train.method,
                "training": training.summary if training else None,
            },
        )
        write_report(report, workdir)
        return {"files": ["report.json", "report.md", "report.png"]}


def adapt_stages(config: ForgetlessConfig) -> list[Stage]:
    """Evaluate the base model, fine-tune it, evaluate the result, report retention."""
    return [
        EvaluateStage("eval_base", config),
        TrainStage(config),
        EvaluateStage("eval_adapted", config, model_from="train"),
        ReportStage(config),
    ]


def run_adapt(
    config: ForgetlessConfig, on_event: Callable[[str, StageResult | str], None] | None = None
) -> dict[str, StageResult]:
    from forgetless.evaluate.tasks import load_tasks

    # Surface every data or task-name mistake before the first stage spends model time.
    load_tasks(
        [*config.evaluate.domain_tasks, *config.evaluate.general_tasks],
        config.evaluate,
        data_dir=config.data_dir,
    )
    load_training_records(config)
    run_dir = RunDirectory(Path(config.run_dir), on_event=on_event or (lambda event, info: None))
    if Path(config.run_dir).exists() and not Path(config.run_dir).is_dir():
        raise ForgetlessError(f"run directory {config.run_dir} exists and is not a directory")
    return run_dir.run_all(adapt_stages(config))
