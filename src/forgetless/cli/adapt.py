"""Commands that adapt and evaluate a model: train, eval, report, run, compare, demo,
continual."""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from forgetless.cli.app import app, cli_command
from forgetless.cli.options import (
    ConfigOpt,
    DataDirOpt,
    DataRevisionOpt,
    DryRunOpt,
    JsonOpt,
    ModelOpt,
    PrivateOpt,
    PushOpt,
    RevisionOpt,
    RunDirOpt,
    SetOpt,
    check_push,
    cli_config,
    config_option,
    config_overrides,
    split_tasks,
)
from forgetless.cli.output import (
    emit,
    err,
    format_optional,
    out,
    print_fields,
    print_markdown,
    print_plan,
    read_json,
    stage_event,
)
from forgetless.config import (
    load_raw,
)
from forgetless.errors import ForgetlessError


@cli_command(app)
def train(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where checkpoints and the model go.")
    ],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    data: Annotated[
        str | None, config_option("data.source", "Data set name, file, or hub data set id.")
    ] = None,
    kind: Annotated[str | None, config_option("data.kind", "How to read the records.")] = None,
    split: Annotated[str | None, config_option("data.split", "Split of the data set.")] = None,
    limit: Annotated[int | None, config_option("data.limit", "Use the first N records.")] = None,
    data_revision: DataRevisionOpt = None,
    method: Annotated[str | None, config_option("train.method", "Training method.")] = None,
    learning_rate: Annotated[
        float | None, config_option("train.learning_rate", "Peak learning rate.")
    ] = None,
    max_steps: Annotated[int | None, config_option("train.max_steps", "Optimizer steps.")] = None,
    batch_size: Annotated[
        int | None, config_option("train.batch_size", "Sequences per micro-batch.")
    ] = None,
    max_length: Annotated[
        int | None, config_option("train.max_length", "Tokens per sequence.")
    ] = None,
    seed: Annotated[int | None, config_option("train.seed", "Random seed.")] = None,
    report_to: Annotated[
        list[str] | None,
        config_option("train.report_to", "Experiment tracker: tensorboard, wandb, trackio, ..."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a training run of other settings in OUTPUT_DIR.")
    ] = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Fine-tune a model (full, LoRA or OSFT); resumes from the last checkpoint in OUTPUT_DIR.

    Run again when finished, it changes nothing; another run in the same OUTPUT_DIR is refused
    unless --overwrite."""
    cfg = cli_config(
        config,
        set_,
        {
            "model.name": model,
            "model.revision": revision,
            "data.source": data,
            "data.kind": kind,
            "data.split": split,
            "data.limit": limit,
            "data.revision": data_revision,
            "train.method": method,
            "train.learning_rate": learning_rate,
            "train.max_steps": max_steps,
            "train.batch_size": batch_size,
            "train.max_length": max_length,
            "train.seed": seed,
            "train.report_to": report_to,
            "data_dir": data_dir,
        },
    )
    from forgetless.data import load_section
    from forgetless.train.sft import remove_run
    from forgetless.train.stages import TrainSettings, train_into

    settings = TrainSettings(model=cfg.model, data=cfg.data, data_file=None, train=cfg.train)
    cfg.train.check_trackers_installed()
    check_push(push_to_hub, private)
    records = load_section(cfg.data, cfg.data_dir)
    if overwrite:
        remove_run(output_dir)
    summary = train_into(
        settings, records, output_dir, cfg.data_dir, push_to_hub=push_to_hub, private=private
    )
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun / accelerate launch
        emit(summary, lambda: print_fields(summary), json_)


@cli_command(app, "eval")
def evaluate(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated tasks, e.g. arc_easy,piqa,c4,gsm8k,ppl:pubmedqa. "
            "[default: evaluate.domain_tasks and evaluate.general_tasks]",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None, config_option("evaluate.limit", "Evaluate the first N items per task.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Also write the metrics to this JSON file.")
    ] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate a model: multiple-choice accuracy, perplexity, GSM8K exact match."""
    cfg = cli_config(
        config,
        set_,
        {
            "model.name": model,
            "model.revision": revision,
            "evaluate.limit": limit,
            "data_dir": data_dir,
        },
    )
    task_names = split_tasks(tasks) or [*cfg.evaluate.domain_tasks, *cfg.evaluate.general_tasks]
    from forgetless.evaluate.tasks import evaluate_tasks, load_tasks
    from forgetless.models import load_configured_model

    # Bad task names and missing data fail here, before the model is loaded.
    prepared = load_tasks(task_names, cfg.evaluate, data_dir=cfg.data_dir)
    loaded = load_configured_model(cfg.model)
    results = evaluate_tasks(loaded.model, loaded.tokenizer, prepared, cfg.evaluate)
    metrics = {name: result.to_dict() for name, result in results.items()}
    if output is not None:
        from forgetless.io import write_json_atomic

        write_json_atomic(output, metrics)

    def show() -> None:
        table = Table(title=f"{cfg.model.name}")
        for column in ("task", "metric", "value", "95% CI", "length-normalised", "n", "seconds"):
            table.add_column(column)
        for result in results.values():
            ci = f"{result.ci95[0]:.4f}–{result.ci95[1]:.4f}" if result.ci95 else ""
            table.add_row(
                result.task,
                result.metric,
                f"{result.value:.4f}",
                ci,
                format_optional(result.details.get("accuracy_norm")),
                str(result.n),
                f"{result.seconds:.0f}",
            )
        out().print(table)

    emit(metrics, show, json_)


@cli_command(app)
def report(
    base_metrics: Annotated[Path, typer.Option(help="metrics.json of the base model.")],
    adapted_metrics: Annotated[Path, typer.Option(help="metrics.json of the adapted model.")],
    domain_tasks: Annotated[str, typer.Option(help="Comma-separated domain tasks.")],
    general_tasks: Annotated[str, typer.Option(help="Comma-separated general tasks.")],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where report.{json,md,png} go.")
    ],
    json_: JsonOpt = False,
) -> None:
    """Build the retention report from two `forgetless eval --output` files."""
    from forgetless.report.retention import build_retention_report, write_report

    def read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ForgetlessError(f"metrics file not found: {path}")
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ForgetlessError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(metrics, dict):
            raise ForgetlessError(f"{path}: expected an object of task metrics")
        return metrics

    built = build_retention_report(
        read(base_metrics),
        read(adapted_metrics),
        split_tasks(domain_tasks) or [],
        split_tasks(general_tasks) or [],
        sources=(str(base_metrics), str(adapted_metrics)),
    )
    write_report(built, output_dir)
    emit(built, lambda: print_markdown(output_dir / "report.md"), json_)


@cli_command(app)
def run(
    config: ConfigOpt = None,
    output_dir: RunDirOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run a recipe: base evaluation, mix/select/train or experts + merge, retention report.

    `recipe.steps` picks the steps between the two evaluations (docs/recipes.md). Finished
    stages are cached in the run directory; an interrupted run resumes.
    """
    cfg = cli_config(config, set_, {"run_dir": output_dir, "data_dir": data_dir})
    if cfg.compare.arms:
        raise ForgetlessError(
            f"{config} defines compare.arms: run it with `forgetless compare --config {config}`"
        )
    cfg.train.check_trackers_installed()
    check_push(push_to_hub, private)
    from forgetless.recipes.adapt import plan_adapt, run_adapt

    if dry_run:
        print_plan(plan_adapt(cfg), json_)
        return

    results = run_adapt(cfg, on_event=stage_event, push_to_hub=push_to_hub, private=private)
    directory = results["report"].directory
    emit(
        read_json(directory / "report.json"),
        lambda: print_markdown(directory / "report.md"),
        json_,
    )
    err.print(f"report files: {directory}")


@cli_command(app)
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config with compare.arms.")],
    output_dir: RunDirOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Compare arms on one base, data and items: the frontier of gain, retention, compute.

    Writes the frontier report (JSON, Markdown, self-contained HTML). Stages the arms share
    (the base evaluation, clusters, gradients) run once; an arm may sweep one setting. An
    interrupted comparison resumes.
    """
    _compare(config, set_, {"run_dir": output_dir, "data_dir": data_dir}, json_, dry_run)


@cli_command(app)
def demo(
    output_dir: RunDirOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Plain fine-tuning of SmolLM2-135M against the recipe forgetless recommends.

    Same data and tokens for both; prints the side-by-side table and writes the HTML frontier
    report (src/forgetless/configs/demo.yaml)."""
    demo_file = resources.files("forgetless") / "configs" / "demo.yaml"
    with resources.as_file(demo_file) as path:
        _compare(path, set_, {"run_dir": output_dir, "data_dir": data_dir}, json_, dry_run)


def _compare(
    path: Path,
    assignments: list[str] | None,
    flags: dict[str, Any],
    as_json: bool,
    dry_run: bool,
) -> None:
    from forgetless.recipes.compare import compare as run_comparison
    from forgetless.recipes.compare import expand_arms, plan_comparison

    overrides, _ = config_overrides(assignments, flags)
    raw = load_raw(path, overrides)
    arms = expand_arms(raw, path)
    for arm in arms:
        arm.config.train.check_trackers_installed()
    run_dir = arms[0].config.run_dir
    if dry_run:
        print_plan(plan_comparison(arms, run_dir), as_json)
        return
    directory = run_comparison(arms, run_dir, on_event=stage_event).directory
    emit(
        read_json(directory / "frontier.json"),
        lambda: print_markdown(directory / "frontier.md"),
        as_json,
    )
    err.print(f"frontier report: {directory / 'frontier.html'}")


def _packaged_defaults(name: str) -> dict[str, Any]:
    """A packaged config as dotted keys, for the defaults that help shows."""
    with resources.as_file(resources.files("forgetless") / "configs" / name) as path:
        raw = load_raw(path)

    def flatten(section: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in section.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(raw, "")


# The continual command's defaults are those of its packaged config.
_continual_option = functools.partial(
    config_option, defaults=_packaged_defaults("continual_fewshot.yaml")
)


@cli_command(app)
def continual(
    benchmark: Annotated[
        str | None,
        _continual_option("continual.benchmark", "Task-sequence benchmark."),
    ] = None,
    order: Annotated[
        int | None,
        _continual_option("continual.order", "Task order: fewshot 1-3, olora 4-6."),
    ] = None,
    method: Annotated[
        str | None,
        _continual_option("continual.method", "Continual strategy."),
    ] = None,
    subset: Annotated[
        str | None,
        _continual_option("continual.subset", "fewshot seed split: 0_42, 1_142 or 2_242."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (default: continual_fewshot.yaml)."),
    ] = None,
    output_dir: RunDirOpt = None,
    data_dir: DataDirOpt = None,
    head: Annotated[
        str | None,
        _continual_option(
            "continual.head", "lm (label log-likelihood) or closed_form (class-incremental head)."
        ),
    ] = None,
    eval_limit: Annotated[
        int | None,
        _continual_option("continual.eval_limit", "Evaluate N items per task."),
    ] = None,
    train_limit: Annotated[
        int | None,
        _continual_option("continual.train_limit", "Train on N records per task."),
    ] = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Learn a task sequence, evaluate every task after each, report BWT, FWT and forgetting.

    Finished stages are cached in the run directory; an interrupted run resumes.
    """
    flags = {
        "continual.benchmark": benchmark,
        "continual.order": order,
        "continual.method": method,
        "continual.subset": subset,
        "continual.head": head,
        "continual.eval_limit": eval_limit,
        "continual.train_limit": train_limit,
        "run_dir": output_dir,
        "data_dir": data_dir,
    }
    packaged = resources.files("forgetless") / "configs" / "continual_fewshot.yaml"
    with resources.as_file(packaged) as default:
        cfg = cli_config(config or default, set_, flags)
    from forgetless.recipes.continual import plan_continual, run_continual

    if dry_run:
        print_plan(plan_continual(cfg), json_)
        return
    results = run_continual(cfg, on_event=stage_event)
    directory = results["report"].directory
    emit(
        read_json(directory / "continual.json"),
        lambda: print_markdown(directory / "continual.md"),
        json_,
    )
    err.print(f"report files: {directory}")
