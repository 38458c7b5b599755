"""The report stage: the retention report of an adapted model against the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from forgetless.report.trackers import Trackers
from forgetless.runs import Stage, StageResult, StageSettings
from forgetless.schema import LOCAL_CHECKPOINT


class ReportSettings(StageSettings):
    domain_tasks: tuple[str, ...]
    general_tasks: tuple[str, ...]
    # What the report says was adapted (model, data, method). Only labels: what the data and
    # model hold reaches the report through its inputs, so a local path needs only to be
    # recognised wherever it lies, by its own files (the cheaper, checkpoint digest).
    meta: dict[str, Any] = Field(json_schema_extra=LOCAL_CHECKPOINT)


class ReportStage(Stage):
    def __init__(
        self,
        name: str,
        domain_tasks: list[str],
        general_tasks: list[str],
        *,
        base: str,
        adapted: str,
        training: str | None = None,
        meta: dict[str, Any] | None = None,
        trackers: Trackers | None = None,
    ):
        self.name, self.base, self.adapted, self.training = name, base, adapted, training
        # Where the report is logged says nothing about its content: not a setting.
        self.trackers = trackers or Trackers()
        self._settings = ReportSettings(
            domain_tasks=tuple(domain_tasks), general_tasks=tuple(general_tasks), meta=meta or {}
        )
        self.depends_on = (base, adapted, *((training,) if training else ()))
        self.summary_inputs = (training,) if training else ()

    def settings(self) -> ReportSettings:
        return self._settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.report.retention import (
            build_retention_report,
            render_markdown,
            write_report,
        )
        from forgetless.report.trackers import retention_scalars

        def metrics(stage: str) -> dict[str, Any]:
            return json.loads((inputs[stage].directory / "metrics.json").read_text())

        settings = self._settings
        report = build_retention_report(
            base=metrics(self.base),
            adapted=metrics(self.adapted),
            domain_tasks=list(settings.domain_tasks),
            general_tasks=list(settings.general_tasks),
            meta={
                **settings.meta,
                "training": inputs[self.training].summary if self.training else None,
            },
        )
        write_report(report, workdir)
        self.trackers.log(workdir, "retention", retention_scalars(report), render_markdown(report))
        return {"files": ["report.json", "report.md", "report.png"]}
