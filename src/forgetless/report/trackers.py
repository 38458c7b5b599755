"""Logging the finished reports to the experiment trackers of ``train.report_to``.

transformers' tracker callbacks see only what the Trainer logs (loss, learning rate); the
retention and frontier reports come after training, from several models, so they are logged
here: as scalars (one per task and arm) plus the Markdown table as text.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Trackers with the wandb-style module API (init, log, finish); Trackio copies it on purpose.
MODULE_TRACKERS = ("wandb", "trackio")
REPORT_TRACKERS = ("tensorboard", *MODULE_TRACKERS)
# Under the report's folder, beside report.json: what TensorBoard's --logdir points at.
TENSORBOARD_DIR = "runs"


@dataclass(frozen=True)
class Trackers:
    """Where a run logs (``train.report_to``, ``train.project``, ``train.run_name``)."""

    report_to: tuple[str, ...] = ()
    project: str = "forgetless"
    run_name: str | None = None

    def log(self, directory: str | Path, name: str, scalars: dict[str, float], markdown: str):
        log_report(
            self.report_to,
            directory,
            name=name,
            scalars=scalars,
            markdown=markdown,
            project=self.project,
            run_name=self.run_name,
        )


def retention_scalars(report: dict[str, Any]) -> dict[str, float]:
    """Per task the adapted value and its change against the base, plus the two means."""
    scalars: dict[str, float] = {}
    for row in report["rows"]:
        prefix = f"{row['group']}/{row['task']}"
        scalars[f"{prefix}/{row['metric']}"] = row["after"]
        scalars[f"{prefix}/improvement_pct"] = row["improvement_pct"]
    for key in ("domain_improvement_pct", "general_improvement_pct"):
        scalars[f"summary/{key}"] = report["summary"][key]
    return _finite(scalars)


def frontier_scalars(frontier: dict[str, Any]) -> dict[str, float]:
    """Per arm its position on the two axes and whether it is Pareto-optimal."""
    scalars: dict[str, float] = {}
    for arm in frontier["arms"]:
        scalars[f"{arm['label']}/domain_gain"] = arm["x"]
        scalars[f"{arm['label']}/general_retention"] = arm["y"]
        scalars[f"{arm['label']}/pareto"] = float(arm["pareto"])
    return _finite(scalars)


def _finite(scalars: dict[str, Any]) -> dict[str, float]:
    # A relative change from a base value of 0 is None in the report; trackers want numbers.
    return {
        key: float(value)
        for key, value in scalars.items()
        if value is not None and math.isfinite(value)
    }


def log_report(
    report_to: Sequence[str],
    directory: str | Path,
    *,
    name: str,
    scalars: dict[str, float],
    markdown: str,
    project: str,
    run_name: str | None = None,
) -> None:
    """Log one report to each tracker; TensorBoard writes under ``directory/runs``."""
    for tracker in report_to:
        if tracker == "tensorboard":
            _log_tensorboard(Path(directory) / TENSORBOARD_DIR, name, scalars, markdown)
        elif tracker in MODULE_TRACKERS:
            _log_module(tracker, project, run_name or name, name, scalars, markdown)
        else:
            logger.warning(
                "%s: the %s report is logged only to %s", tracker, name, ", ".join(REPORT_TRACKERS)
            )


def _log_tensorboard(folder: Path, name: str, scalars: dict[str, float], markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for key, value in scalars.items():
            writer.add_scalar(f"{name}/{key}", value, global_step=0)
        writer.add_text(name, markdown, global_step=0)
    finally:
        writer.close()


def _log_module(
    tracker: str, project: str, run_name: str, name: str, scalars: dict[str, float], markdown: str
) -> None:
    module = importlib.import_module(tracker)
    module.init(project=project, name=run_name, config={"report": name})
    try:
        module.log({f"{name}/{key}": value for key, value in scalars.items()})
        # Markdown as one text entry: both trackers render HTML, neither Markdown tables.
        module.log({f"{name}/table": module.Html(f"<pre>{_escape(markdown)}</pre>")})
    finally:
        module.finish()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
