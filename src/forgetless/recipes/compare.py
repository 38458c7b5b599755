"""Comparing arms: several adapt recipes on one base model, data and evaluation items.

``compare.arms`` names each arm and the settings it changes; an arm may sweep one setting,
giving one point per value, and ``compare.seeds`` trains every point once per seed, the point
then being the mean of its models. Every arm's plan runs in one run directory, so what arms share
runs once (the base evaluation, a mixture's clusters, a selection's gradients). The result is
the frontier report (:mod:`forgetless.report.frontier`): each point's paired change against
the base on every task, its compute, and the Pareto-optimal arms, as JSON, Markdown and a
self-contained HTML page in ``<run_dir>/frontier/``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetless.cards import set_retention
from forgetless.config import ForgetlessConfig, set_dotted, validate_config
from forgetless.errors import ForgetlessError
from forgetless.recipes.adapt import (
    ADAPTED_EVAL,
    BASE_EVAL,
    MODEL_DIR,
    Plan,
    adapt_plan,
    check_inputs,
    describe,
    retention_markdown,
    trackers_of,
)
from forgetless.runs import PlannedStage, StageResult, run_directory

FRONTIER_DIR = "frontier"
ARM_KEYS = ("sweep", "description")  # an arm's entries that are not config sections


@dataclass
class Arm:
    name: str
    label: str  # the model's name: the arm, its swept value if any, its seed if several
    folder: str  # where its own stages go in the run directory
    sweep: dict[str, Any]
    description: str
    config: ForgetlessConfig
    point: str = ""  # the frontier point it counts towards: the label without the seed
    seed: int | None = None  # compare.seeds: the training seed of this model

    def __post_init__(self):
        self.point = self.point or self.label


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=@+-]", "_", text)


def expand_arms(raw: dict[str, Any], origin: str | Path | None = None) -> list[Arm]:
    """One :class:`Arm` per arm and swept value of ``raw``'s ``compare.arms``."""
    # Every arm keeps the comparison's own settings (its axes) but not the list of arms.
    prefix = f"{origin}: " if origin else ""
    compare_raw = raw.get("compare") or {}
    if not isinstance(compare_raw, dict):
        raise ForgetlessError(f"{prefix}compare: expected a mapping (arms, seeds, axes)")
    base_raw = {key: value for key, value in raw.items() if key != "compare"}
    base_raw["compare"] = {key: value for key, value in compare_raw.items() if key != "arms"}
    base = validate_config(base_raw, origin)
    arms_raw = compare_raw.get("arms") or {}
    if not isinstance(arms_raw, dict):
        raise ForgetlessError(f"{prefix}compare.arms: expected a mapping of arm names to settings")
    if not arms_raw:
        raise ForgetlessError(f"{origin or 'the config'}: compare.arms names no arm to run")
    arms: list[Arm] = []
    for name, spec in arms_raw.items():
        where = f"{origin}: compare.arms.{name}" if origin else f"compare.arms.{name}"
        arm_keys = ("compare", "arms", str(name))
        spec = spec or {}
        if not isinstance(spec, dict):
            raise ForgetlessError(f"{where}: expected a mapping of config sections")
        sweep = spec.get("sweep") or {}
        if not isinstance(sweep, dict) or len(sweep) > 1:
            raise ForgetlessError(
                f"{where}.sweep: give one setting, e.g. {{train.learning_rate: [1e-4, 3e-4]}}"
            )
        changes = {key: value for key, value in spec.items() if key not in ARM_KEYS}
        if base.compare.seeds and ("seed" in (changes.get("train") or {}) or "train.seed" in sweep):
            raise ForgetlessError(
                f"{where}: sets train.seed, which compare.seeds sets for every arm; give one"
            )
        points = [(None, None)]
        if sweep:
            key, values = next(iter(sweep.items()))
            if not isinstance(values, list) or not values:
                raise ForgetlessError(f"{where}.sweep.{key}: give a list of values")
            points = [(key, value) for value in values]
        for key, value in points:
            arm_raw = _merge(base_raw, changes)
            label, folder = name, name
            if key is not None:
                set_dotted(arm_raw, key, value)
                shown = (
                    f"{key.rsplit('.', 1)[-1]}={value:g}"
                    if isinstance(value, float)
                    else f"{key.rsplit('.', 1)[-1]}={value}"
                )
                label, folder = f"{name} {shown}", f"{name}@{shown}"
            config = validate_config(arm_raw, origin, within=arm_keys)
            if config.model != base.model or config.evaluate != base.evaluate:
                raise ForgetlessError(
                    f"{where}: an arm may not change the model or the evaluation; every arm is "
                    "scored against the same base on the same items"
                )
            sweep_point = {key: value} if key else {}
            description = str(spec.get("description", ""))
            if not base.compare.seeds:
                arms.append(Arm(name, label, _safe(folder), sweep_point, description, config))
            for seed in base.compare.seeds:
                seeded_raw = copy.deepcopy(arm_raw)
                set_dotted(seeded_raw, "train.seed", seed)
                seeded = validate_config(seeded_raw, origin, within=arm_keys)
                arms.append(
                    Arm(name, f"{label} seed={seed}", _safe(f"{folder}@seed={seed}"),
                        sweep_point, description, seeded, point=label, seed=seed)
                )  # fmt: skip
    return arms


def _compute(plan: Plan, results: dict[str, StageResult]) -> dict[str, Any]:
    """What producing the arm's model cost: its data and training stages together."""
    summaries = [results[name].summary for name in plan.training]
    trained = [summary for summary in summaries if "input_tokens_seen" in summary]
    memory = [s["peak_memory_mb"] for s in trained if s.get("peak_memory_mb") is not None]
    return {
        "tokens": sum(s["input_tokens_seen"] for s in trained),
        "epochs": max((s["epochs"] for s in trained), default=0.0),
        "steps": sum(s["steps"] for s in trained),
        "seconds": sum(results[name].seconds or 0.0 for name in plan.training),
        "peak_memory_mb": max(memory) if memory else None,
    }


def _pooled_points(arms: list[Arm], points, tasks, base, evaluations) -> list[dict[str, Any]]:
    """One frontier point per arm and swept value: the mean change of its models over their
    seeds, with an interval that resamples the items (paired) and the seeds
    (:mod:`forgetless.evaluate.seeded`), in the units of the per-model changes."""
    from forgetless.evaluate.seeded import TaskItems, seeded_changes, shown

    groups: dict[str, list[str]] = {}
    for arm in arms:
        groups.setdefault(arm.point, []).append(arm.label)
    by_label = {point["label"]: point for point in points}
    pooled = {
        task: seeded_changes(TaskItems.read(task, base, evaluations), groups, []) for task in tasks
    }
    result = []
    for name, labels in groups.items():
        models = [by_label[label] for label in labels]
        changes = {}
        for task in tasks:
            arm, unit = pooled[task]["arms"][name], pooled[task]["unit"]
            changes[task] = {
                "unit": models[0]["changes"][task]["unit"],
                "change": shown(arm["mean"], unit),
                "ci95": [shown(bound, unit) for bound in arm["ci95"]],
                "per_seed": [shown(value, unit) for value in arm["per_seed"]],
            }
        computes = [model["compute"] for model in models]
        memory = [c["peak_memory_mb"] for c in computes if c["peak_memory_mb"] is not None]
        result.append(
            {
                "label": name,
                "arm": models[0]["arm"],
                "sweep": models[0]["sweep"],
                "description": models[0]["description"],
                "models": labels,
                "changes": changes,
                # What one model of the point cost, on average over its seeds.
                "compute": {
                    **{
                        key: sum(c[key] for c in computes) / len(computes)
                        for key in ("tokens", "epochs", "steps", "seconds")
                    },
                    "peak_memory_mb": max(memory) if memory else None,
                },
            }
        )
    return result


@dataclass
class Comparison:
    frontier: dict[str, Any]  # the report (forgetless.report.frontier)
    directory: Path  # where frontier.{json,md,html} are
    arms: list[Arm]
    plans: dict[str, Plan]  # by arm folder
    results: dict[str, dict[str, StageResult]]  # by arm folder, then stage name

    def of(self, label: str) -> tuple[Plan, dict[str, StageResult]]:
        """The plan and stage results of the point labelled ``label``."""
        folder = next(arm.folder for arm in self.arms if arm.label == label)
        return self.plans[folder], self.results[folder]


def _tasks_and_axes(first: ForgetlessConfig) -> tuple[list[str], dict[str, str]]:
    evaluate = first.evaluate
    if not evaluate.domain_tasks or not evaluate.general_tasks:
        raise ForgetlessError(
            "a comparison needs evaluate.domain_tasks and evaluate.general_tasks: the frontier "
            "plots domain gain against general retention"
        )
    tasks = list(dict.fromkeys([*evaluate.domain_tasks, *evaluate.general_tasks]))
    axes = {
        "x_task": first.compare.x_task or evaluate.domain_tasks[0],
        "y_task": first.compare.y_task or evaluate.general_tasks[0],
    }
    for axis, task in axes.items():
        if task not in tasks:
            raise ForgetlessError(f"compare.{axis} {task!r} is not among the evaluated tasks")
    return tasks, axes


def _arm_plans(arms: list[Arm], progress: bool) -> dict[str, Plan]:
    for arm in arms:
        check_inputs(arm.config)
    return {arm.folder: adapt_plan(arm.config, progress=progress) for arm in arms}


def plan_comparison(arms: list[Arm], run_dir: str | Path) -> list[PlannedStage]:
    """What :func:`compare` would run and reuse, running nothing (``--dry-run``)."""
    _tasks_and_axes(arms[0].config)
    plans = _arm_plans(arms, progress=False)
    runs = run_directory(run_dir, arms[0].config)
    return runs.plan({folder: plan.stages for folder, plan in plans.items()})


def compare(
    arms: list[Arm],
    run_dir: str | Path,
    *,
    on_event: Callable[[str, StageResult | str], None] | None = None,
    progress: bool = True,
    title: str | None = None,
    frontier_dir: str | Path | None = None,
) -> Comparison:
    """Run every arm (sharing what they share) and write the frontier report, by default in
    ``<run_dir>/frontier``."""
    from forgetless.evaluate.stats import paired_task_change, read_evaluation
    from forgetless.report.frontier import build_frontier, render_markdown, write_frontier
    from forgetless.report.trackers import frontier_scalars

    first = arms[0].config
    evaluate = first.evaluate
    tasks, axes = _tasks_and_axes(first)
    plans = _arm_plans(arms, progress)
    runs = run_directory(run_dir, first, on_event)
    results = runs.run_plans({folder: plan.stages for folder, plan in plans.items()})
    base = read_evaluation(results[arms[0].folder][BASE_EVAL].directory)
    points, evaluations = [], {}
    for arm in arms:
        arm_results = results[arm.folder]
        evaluation = evaluations[arm.label] = read_evaluation(arm_results[ADAPTED_EVAL].directory)
        plan = plans[arm.folder]
        model = arm_results[plan.model_stage]
        # An arm finished on another machine may have left only its results in the archive.
        model_dir = model.directory / MODEL_DIR if model.artefacts else None
        if model_dir is not None:
            set_retention(model_dir, retention_markdown(arm_results))
        points.append(
            {
                "label": arm.label,
                "arm": arm.name,
                "sweep": arm.sweep,
                "description": arm.description or describe(plan.notes),
                "changes": {task: paired_task_change(task, base, evaluation) for task in tasks},
                "compute": _compute(plan, arm_results),
                "model_dir": None if model_dir is None else str(model_dir),
            }
        )
    comparison = {
        "title": title or f"forgetless compare: {first.model.name}",
        "model": first.model.name,
        **axes,
        "domain_tasks": list(evaluate.domain_tasks),
        "general_tasks": list(evaluate.general_tasks),
        "base": {
            task: {
                key: base[0][task][key]
                for key in ("metric", "value", "higher_is_better", "n", "ci95")
            }
            for task in tasks
        },
        "arms": points,
    }
    if first.compare.seeds:
        comparison.update(
            seeds=list(first.compare.seeds),
            models=points,
            arms=_pooled_points(arms, points, tasks, base, evaluations),
        )
    frontier = build_frontier(comparison)
    directory = Path(frontier_dir) if frontier_dir is not None else Path(run_dir) / FRONTIER_DIR
    previous = directory / "frontier.json"
    unchanged = previous.is_file() and json.loads(previous.read_text()) == json.loads(
        json.dumps(frontier)
    )
    write_frontier(frontier, directory)
    if not unchanged:  # a rerun of a finished comparison logs nothing twice
        trackers_of(first).log(
            directory, "frontier", frontier_scalars(frontier), render_markdown(frontier)
        )
    return Comparison(frontier, directory, arms, plans, results)
