"""The retention report: domain gain vs general-ability retention vs compute cost.

Input: the task metrics of a base and of an adapted model (as written by the evaluation
stage). Output: ``report.json`` (everything), ``report.md`` (a table) and ``report.png``
(the change of every task, oriented so that up is better).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError


def _row(task: str, group: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    higher_is_better = bool(before["higher_is_better"])
    delta = after["value"] - before["value"]
    # Oriented so that a positive number always means "the adapted model is better"; a relative
    # change from a base value of 0 is undefined (None, not NaN, so the JSON stays valid).
    improvement = None
    if before["value"]:
        relative = delta / before["value"]
        improvement = 100 * (relative if higher_is_better else -relative)
    return {
        "group": group,
        "task": task,
        "metric": before["metric"],
        "higher_is_better": higher_is_better,
        "before": before["value"],
        "after": after["value"],
        "delta": delta,
        "improvement_pct": improvement,
        "before_ci95": before.get("ci95"),
        "after_ci95": after.get("ci95"),
        "n": after.get("n"),
    }


def _task_metrics(metrics: dict[str, Any], task: str, source: str) -> dict[str, Any]:
    """One task's entry of a metrics file, checked: a report from a malformed or non-finite
    entry would be silently wrong."""
    if task not in metrics:
        raise ForgetlessError(f"{source}: task {task!r} is missing")
    entry = metrics[task]
    if not isinstance(entry, dict):
        raise ForgetlessError(f"{source}: task {task!r} is not an object of metrics")
    missing = [key for key in ("metric", "value", "higher_is_better") if key not in entry]
    if missing:
        raise ForgetlessError(
            f"{source}: task {task!r} lacks {', '.join(missing)} (metrics files come from "
            "`forgetless eval --output`)"
        )
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ForgetlessError(f"{source}: task {task!r} has value {value!r}, not a finite number")
    return entry


def build_retention_report(
    base: dict[str, Any],
    adapted: dict[str, Any],
    domain_tasks: list[str],
    general_tasks: list[str],
    meta: dict[str, Any] | None = None,
    sources: tuple[str, str] = ("the base metrics", "the adapted metrics"),
) -> dict[str, Any]:
    """``sources`` names the two metrics in errors (e.g. their files)."""
    rows = []
    for group, tasks in (("domain", domain_tasks), ("general", general_tasks)):
        for task in tasks:
            before = _task_metrics(base, task, sources[0])
            after = _task_metrics(adapted, task, sources[1])
            rows.append(_row(task, group, before, after))

    def mean_improvement(group: str) -> float | None:
        values = [
            row["improvement_pct"]
            for row in rows
            if row["group"] == group and row["improvement_pct"] is not None
        ]
        return sum(values) / len(values) if values else None

    training = (meta or {}).get("training") or {}
    return {
        "meta": meta or {},
        "rows": rows,
        "summary": {
            "domain_improvement_pct": mean_improvement("domain"),
            "general_improvement_pct": mean_improvement("general"),
            "train_seconds": training.get("train_runtime_s"),
            "train_tokens": training.get("input_tokens_seen"),
            "train_steps": training.get("steps"),
        },
    }


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    if metric in ("accuracy", "exact_match"):
        return f"{100 * value:.2f} %"
    return f"{value:.3f}"


def _fmt_ci(interval, metric: str) -> str:
    if not interval:
        return ""
    low, high = interval
    return f" [{_fmt(low, metric)}, {_fmt(high, metric)}]"


def render_markdown(report: dict[str, Any]) -> str:
    meta, summary = report["meta"], report["summary"]
    lines = ["# Retention report", ""]
    described = [f"{key}: `{meta[key]}`" for key in ("model", "data", "method") if meta.get(key)]
    if described:
        lines += [", ".join(described), ""]
    lines += [
        "| group | task | metric | before (95% CI) | after (95% CI) | Δ | better by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        metric = row["metric"]
        delta_scale = 100 if metric in ("accuracy", "exact_match") else 1
        unit = " pt" if delta_scale == 100 else ""
        lines.append(
            f"| {row['group']} | {row['task']} | {metric} "
            f"| {_fmt(row['before'], metric)}{_fmt_ci(row['before_ci95'], metric)} "
            f"| {_fmt(row['after'], metric)}{_fmt_ci(row['after_ci95'], metric)} "
            f"| {delta_scale * row['delta']:+.2f}{unit} | {_fmt_change(row['improvement_pct'])} |"
        )
    lines.append("")
    for group in ("domain", "general"):
        value = summary.get(f"{group}_improvement_pct")
        if value is not None:
            lines.append(f"- mean {group} change (positive = better): {value:+.1f} %")
    if summary.get("train_seconds") is not None:
        lines.append(
            f"- compute: {summary['train_steps']} optimizer steps, "
            f"{summary['train_tokens']} input tokens, {summary['train_seconds']:.0f} s of training"
        )
    return "\n".join(lines) + "\n"


def _fmt_change(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [row["task"] for row in rows]
    values = [row["improvement_pct"] or 0.0 for row in rows]
    colours = ["tab:blue" if row["group"] == "domain" else "tab:orange" for row in rows]
    figure, axis = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1), 3.5))
    axis.bar(range(len(rows)), values, color=colours)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    axis.set_ylabel("change vs base, % (up = better)")
    axis.set_title("Domain (blue) gain vs general (orange) retention")
    figure.tight_layout()
    from forgetless.io import atomic_file

    with atomic_file(path, "wb") as out:
        figure.savefig(out, dpi=120, format="png")
    plt.close(figure)


def write_report(report: dict[str, Any], directory: str | Path) -> None:
    from forgetless.io import write_json_atomic, write_text_atomic

    directory = Path(directory)
    write_json_atomic(directory / "report.json", report)
    write_text_atomic(directory / "report.md", render_markdown(report))
    plot_report(report, directory / "report.png")
