"""A training run that records held-out losses on its way (``trajectory.json``).

The same training as :class:`~forgetless.train.stages.TrainStage` on a data section (same
settings, seed and records, hence the same updates: scoring runs without gradients and
draws no random numbers), with :class:`~forgetless.evaluate.during_training.HeldOutLosses`
measuring perplexity tasks at chosen steps. It keeps the measurements and drops the model,
which the plain training of the same arm already has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from forgetless.data.config import DataConfig
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings
from forgetless.schema import LOCAL_CONTENT
from forgetless.train.config import TrainConfig
from forgetless.train.stages import MODEL_DIR, TrainSettings, TrainStage, train_into

TRAJECTORY_FILE = "trajectory.json"


class TrajectorySettings(StageSettings):
    run: TrainSettings
    tasks: list[str] = Field(json_schema_extra=LOCAL_CONTENT)  # perplexity tasks
    steps: list[int]  # optimizer steps after which they are scored (0: before training)
    evaluate: EvalConfig  # item counts and scoring


class TrajectoryStage(Stage):
    """``train`` on ``data``, as ``TrainStage`` would, scoring ``tasks`` after ``steps``."""

    def __init__(
        self,
        name: str,
        model: ModelConfig,
        train: TrainConfig,
        data: DataConfig,
        tasks: list[str],
        steps: list[int],
        evaluate: EvalConfig,
        *,
        data_dir: str | None = None,
    ):
        if train.max_steps < 1 or max(steps) > train.max_steps:
            raise ForgetlessError(
                f"trajectory steps {steps} must lie within train.max_steps ({train.max_steps})"
            )
        self.name, self.depends_on = name, ()
        self.training = TrainStage(name, model, train, data=data, data_dir=data_dir)
        self._settings = TrajectorySettings(
            run=self.training.settings(), tasks=tasks, steps=sorted(set(steps)), evaluate=evaluate
        )

    def settings(self) -> TrajectorySettings:
        return self._settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.evaluate.during_training import HeldOutLosses
        from forgetless.train.sft import CHECKPOINTS_DIR

        settings = self._settings
        summary = train_into(
            settings.run,
            self.training.records({}),
            workdir,
            self.training.data_dir,
            make_callbacks=lambda tokenizer: [
                HeldOutLosses(
                    tokenizer,
                    settings.tasks,
                    settings.steps,
                    settings.evaluate,
                    workdir / TRAJECTORY_FILE,
                    data_dir=self.training.data_dir,
                )
            ],
        )
        shutil.rmtree(workdir / CHECKPOINTS_DIR, ignore_errors=True)
        shutil.rmtree(workdir / MODEL_DIR, ignore_errors=True)
        measured = json.loads((workdir / TRAJECTORY_FILE).read_text())
        missing = [step for step in settings.steps if str(step) not in measured]
        if missing:
            raise ForgetlessError(f"the run ended without scoring steps {missing}")
        return {
            "steps": summary["steps"],
            "input_tokens_seen": summary["input_tokens_seen"],
            "train_seconds": summary["seconds"],
            "mean_nll": {
                task: {step: measured[step][task]["mean_nll"] for step in measured}
                for task in settings.tasks
            },
        }
