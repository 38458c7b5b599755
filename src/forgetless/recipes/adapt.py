"""The adapt recipe: evaluate the base → [mix] → [select] → train, or train domain experts →
merge → evaluate the adapted model → report; ``recipe.steps`` picks the steps.

Each step feeds the next through its artefact: the mixture's sampled training set and the
selection's records are files the next stage reads (identified by their stage's
fingerprint), the experts' checkpoints are what the merge reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from forgetless.cards import set_retention
from forgetless.config import ForgetlessConfig
from forgetless.evaluate.stages import EvaluateStage
from forgetless.hub import check_push_access, push_model
from forgetless.merge.stages import MergeExpertsStage
from forgetless.report.stages import ReportStage
from forgetless.report.trackers import Trackers
from forgetless.runs import PlannedStage, Stage, StageResult, run_directory
from forgetless.train.stages import TrainStage

BASE_EVAL = "eval_base"
ADAPTED_EVAL = "eval_adapted"
REPORT = "report"
MODEL_DIR = "model"


@dataclass
class Plan:
    """A recipe's stages in order, and the roles the comparison reads them by."""

    stages: list[Stage]
    model_stage: str  # whose model/ is the adapted model
    training: list[str]  # stages whose compute is the adaptation's (data work included)
    notes: dict[str, str] = field(default_factory=dict)


def adapt_plan(config: ForgetlessConfig, *, progress: bool = True) -> Plan:
    """The stages of ``config.recipe`` for ``config``."""

    steps = config.recipe.steps
    model, data_dir = config.model, config.data_dir
    stages: list[Stage] = [EvaluateStage(BASE_EVAL, model, config.evaluate, data_dir=data_dir)]
    before = len(stages)
    notes: dict[str, str] = {}
    if "merge" in steps:
        experts = []
        for name, data in config.recipe.experts.items():
            expert = f"train_{name}"
            stages.append(
                TrainStage(
                    expert, model, config.train, data=data, data_dir=data_dir, progress=progress
                )
            )
            experts.append(expert)
        stages.append(MergeExpertsStage("merge", model, config.merge, experts))
        model_stage = "merge"
        notes.update(train=config.train.method, merge=config.merge.method)
    else:
        records_from = None
        if "mix" in steps:
            from forgetless.mix.stages import Mixture, mixture_stages

            mixture = Mixture(model, config.mix, data_dir=data_dir, progress=progress)
            stages += mixture_stages(mixture)
            records_from = stages[-1].name
            notes["mix"] = config.mix.method
        if "select" in steps:
            from forgetless.select.stages import Selection, selection_stages

            selection = Selection(
                model,
                config.data if records_from is None else None,
                config.select,
                pool_from=records_from,
                data_dir=data_dir,
                progress=progress,
            )
            stages += selection_stages(selection)
            records_from = stages[-1].name
            notes["select"] = f"{config.select.method} {config.select.budget:g}"
        stages.append(
            TrainStage(
                "train",
                model,
                config.train,
                data=config.data if records_from is None else None,
                records_from=records_from,
                data_dir=data_dir,
                progress=progress,
            )
        )
        model_stage = "train"
        notes["train"] = config.train.method
    training = [stage.name for stage in stages[before:]]
    evaluate = config.evaluate
    stages.append(
        EvaluateStage(ADAPTED_EVAL, model, evaluate, model_from=model_stage, data_dir=data_dir)
    )
    meta = {"model": model.name, "data": _data_description(config), "method": describe(notes)}
    stages.append(
        ReportStage(
            REPORT,
            evaluate.domain_tasks,
            evaluate.general_tasks,
            base=BASE_EVAL,
            adapted=ADAPTED_EVAL,
            training=model_stage,
            meta=meta,
            trackers=trackers_of(config),
        )
    )
    return Plan(stages, model_stage, training, notes)


def trackers_of(config: ForgetlessConfig) -> Trackers:
    train = config.train
    return Trackers(tuple(train.report_to), train.project, train.run_name)


def _data_description(config: ForgetlessConfig) -> str:
    if "merge" in config.recipe.steps:
        return ", ".join(f"{n}: {d.source}" for n, d in config.recipe.experts.items())
    if "mix" in config.recipe.steps:
        return " + ".join(config.mix.sources)
    return config.data.source


def describe(notes: dict[str, str]) -> str:
    """A recipe's steps and methods in a few words, e.g. 'select ogs 0.1, train osft'."""
    return ", ".join(f"{step} {value}" for step, value in notes.items())


def check_inputs(config: ForgetlessConfig) -> None:
    """Surface every data or task-name mistake before the first stage spends model time."""
    from forgetless.data import load_section
    from forgetless.data.features import check_one_block
    from forgetless.data.records import TextRecord
    from forgetless.evaluate.tasks import load_tasks
    from forgetless.models import load_tokenizer

    evaluate = config.evaluate
    load_tasks(
        [*evaluate.domain_tasks, *evaluate.general_tasks], evaluate, data_dir=config.data_dir
    )
    steps = config.recipe.steps
    if "merge" in steps:
        # Per-expert merge settings must fit the experts before any of them trains.
        config.merge.expert_keeps(len(config.recipe.experts))
        for data in config.recipe.experts.values():
            load_section(data, config.data_dir)
    elif "mix" in steps:
        from forgetless.mix.corpus import load_corpus

        load_corpus(config.mix.sources, config.mix.limit_per_source, config.data_dir)
    else:
        records = load_section(config.data, config.data_dir)
        if steps == ["train"] and records and isinstance(records[0], TextRecord):
            # Packed text shorter than one block would fail only after the base evaluation.
            tokenizer = load_tokenizer(
                config.model.name, config.model.trust_remote_code, config.model.revision
            )
            check_one_block(tokenizer, [record.text for record in records], config.train.max_length)


def plan_adapt(config: ForgetlessConfig) -> list[PlannedStage]:
    """What :func:`run_adapt` would run and reuse, running nothing (``--dry-run``)."""
    check_inputs(config)
    plan = adapt_plan(config, progress=False)
    runs = run_directory(config.run_dir, config)
    return runs.plan({"": plan.stages}, keep=(plan.model_stage,))


def run_adapt(
    config: ForgetlessConfig,
    on_event: Callable[[str, StageResult | str], None] | None = None,
    *,
    progress: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
) -> dict[str, StageResult]:
    """Run (or resume) the recipe; the ``report`` result holds ``report.{json,md,png}``.

    The adapted model's card gets the retention table. With ``push_to_hub`` (a repository
    id) the access is checked before the first stage, and the adapted model is uploaded at the
    end (``private`` if the repository is new); ``on_event("pushed", url)`` reports it.
    """
    check_inputs(config)
    if push_to_hub is not None:
        check_push_access(push_to_hub)
    on_event = on_event or (lambda event, info: None)
    plan = adapt_plan(config, progress=progress)
    # The adapted model is what this command delivers: never left in the archive only.
    runs = run_directory(config.run_dir, config, on_event)
    results = runs.run_all(plan.stages, keep=(plan.model_stage,))
    model_dir = results[plan.model_stage].directory / MODEL_DIR
    set_retention(model_dir, retention_markdown(results))
    if push_to_hub is not None:
        message = f"forgetless run: {describe(plan.notes)} on {config.model.name}"
        on_event("pushed", push_model(model_dir, push_to_hub, private, message))
    return results


def _value(value: float, metric: str) -> str:
    return f"{100 * value:.2f} %" if metric in ("accuracy", "exact_match") else f"{value:.3f}"


def retention_markdown(results: dict[str, StageResult]) -> str:
    """The adapted model against the base for its card: each task's change with its paired
    95 % interval (the same items scored by both), and the mean change per group."""
    from forgetless.evaluate.stats import paired_task_change, read_evaluation

    report = json.loads((results[REPORT].directory / "report.json").read_text())
    base = read_evaluation(results[BASE_EVAL].directory)
    adapted = read_evaluation(results[ADAPTED_EVAL].directory)
    meta = report["meta"]
    lines = [
        f"Against the base `{meta['model']}` on the same items; recipe: {meta['method']}; "
        f"data: {meta['data']}. Intervals are paired 95 % intervals of the change.",
        "",
        "| group | task | metric | base | this model | change (95 % CI) |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        metric = row["metric"]
        change = paired_task_change(row["task"], base, adapted)
        low, high = change["ci95"]
        unit = "pt" if change["unit"] == "points" else "% perplexity"
        lines.append(
            f"| {row['group']} | {row['task']} | {metric} | {_value(row['before'], metric)} "
            f"| {_value(row['after'], metric)} "
            f"| {change['change']:+.2f} {unit} [{low:+.2f}, {high:+.2f}] |"
        )
    lines.append("")
    for group in ("domain", "general"):
        mean = report["summary"].get(f"{group}_improvement_pct")
        if mean is not None:
            lines.append(f"- mean {group} change (positive = better): {mean:+.1f} %")
    return "\n".join(lines) + "\n"
