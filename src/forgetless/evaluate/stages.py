"""The evaluation stage: a model (the base, or an upstream stage's) on a list of tasks."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import Field

from forgetless.evaluate.config import EvalConfig, ScoringConfig, UserTaskConfig
from forgetless.io import write_json_atomic
from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings
from forgetless.schema import LOCAL_CONTENT

METRICS_FILE = "metrics.json"
ITEMS_FILE = "items.json"
MODEL_DIR = "model"
# Each task's result as soon as it is scored: an evaluation killed half-way (a long list of
# tasks on a large model) resumes at the first unscored task instead of starting over.
FINISHED_TASKS_DIR = "finished_tasks"


class EvaluateSettings(StageSettings):
    model: ModelConfig | None  # None: the model of the upstream stage ``model_from``
    tasks: tuple[str, ...] = Field(json_schema_extra=LOCAL_CONTENT)
    limits: dict[str, int | None]  # items per task (None: all)
    user_tasks: dict[str, UserTaskConfig]  # the user-defined ones among ``tasks``
    scoring: ScoringConfig

    def as_eval_config(self) -> EvalConfig:
        return EvalConfig(
            domain_tasks=[],
            general_tasks=list(self.tasks),
            tasks=self.user_tasks,
            task_limits={task: n for task, n in self.limits.items() if n is not None},
            scoring=self.scoring,
        )


def evaluate_settings(
    model: ModelConfig | None, evaluate: EvalConfig, tasks: list[str] | None = None
) -> EvaluateSettings:
    """The settings of evaluating ``tasks`` (default: the domain then the general tasks)."""
    if tasks is None:
        tasks = list(dict.fromkeys([*evaluate.domain_tasks, *evaluate.general_tasks]))
    return EvaluateSettings(
        model=model,
        tasks=tuple(tasks),
        limits={task: evaluate.limit_for(task) for task in tasks},
        user_tasks={name: spec for name, spec in evaluate.tasks.items() if name in tasks},
        scoring=evaluate.scoring,
    )


def load_stage_model(model: ModelConfig, inputs: dict[str, StageResult], model_from: str | None):
    """The configured base model, or the ``model/`` written by the upstream stage."""
    from forgetless.models import load_configured_model

    trained = None if model_from is None else str(inputs[model_from].directory / MODEL_DIR)
    return load_configured_model(model, name=trained)


class EvaluateStage(Stage):
    """Evaluate a model: ``model_from`` names the stage whose ``model/`` it scores, or None
    for the base model."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        evaluate: EvalConfig,
        *,
        model_from: str | None = None,
        tasks: list[str] | None = None,
        data_dir: str | None = None,
    ):
        self.name, self.model, self.model_from, self.data_dir = name, model, model_from, data_dir
        # An upstream model is identified by its stage's fingerprint; the loading settings
        # (dtype, device) are still the model section's.
        self._settings = evaluate_settings(None if model_from else model, evaluate, tasks)
        self.depends_on = (model_from,) if model_from else ()

    def settings(self) -> EvaluateSettings:
        return self._settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.evaluate.tasks import TaskResult, load_tasks, score_task

        config = self._settings.as_eval_config()
        prepared = load_tasks(list(self._settings.tasks), config, data_dir=self.data_dir)
        finished = workdir / FINISHED_TASKS_DIR
        loaded, results = None, {}
        for name, (spec, records) in prepared.items():
            saved = finished / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"
            if saved.is_file():
                results[name] = TaskResult.from_record(json.loads(saved.read_text()))
                continue
            if loaded is None:
                loaded = load_stage_model(self.model, inputs, self.model_from)
            results[name] = score_task(loaded.model, loaded.tokenizer, spec, records, config)
            write_json_atomic(saved, asdict(results[name]))
        metrics = {task: result.to_dict() for task, result in results.items()}
        write_json_atomic(workdir / METRICS_FILE, metrics)
        write_json_atomic(
            workdir / ITEMS_FILE, {task: result.per_item for task, result in results.items()}
        )
        shutil.rmtree(finished, ignore_errors=True)  # everything it held is in the two files above
        return {
            "metrics_file": METRICS_FILE,
            "items_file": ITEMS_FILE,
            "tasks": list(metrics),
            "seconds": {task: result.seconds for task, result in results.items()},
        }
