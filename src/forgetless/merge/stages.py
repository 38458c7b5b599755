"""The merge stage: the upstream experts' models merged into their base model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from forgetless.merge.config import MergeConfig
from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings

MODEL_DIR = "model"


class MergeSettings(StageSettings):
    model: ModelConfig  # the base the experts were fine-tuned from
    merge: MergeConfig


class MergeExpertsStage(Stage):
    """Merge the models of the stages ``experts`` into the base model."""

    def __init__(self, name: str, model: ModelConfig, merge: MergeConfig, experts: list[str]):
        self.name = name
        self._settings = MergeSettings(model=model, merge=merge)
        self.depends_on = tuple(experts)

    def settings(self) -> MergeSettings:
        return self._settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.merge.merger import merge_checkpoints

        started = time.perf_counter()
        experts = [str(inputs[name].directory / MODEL_DIR) for name in self.depends_on]
        report = merge_checkpoints(
            self._settings.model.name,
            experts,
            workdir / MODEL_DIR,
            self._settings.merge,
            overwrite=True,
        )
        return {
            "model_dir": MODEL_DIR,
            "experts": list(self.depends_on),
            "collision_rate": report.overlap["collision_rate"],
            "mean_abs_cosine_masked": report.overlap["mean_abs_cosine_masked"],
            "seconds": time.perf_counter() - started,
        }
