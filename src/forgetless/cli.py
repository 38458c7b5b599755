"""The ``forgetless`` command line: a thin layer over the Python API.

Every command reads the one config schema (``--config file.yaml``), lets its flags and
``--set section.key=value`` override it, and reports user mistakes as one line on stderr with
exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from forgetless import registry
from forgetless.config import (
    METHOD_SECTIONS,
    ForgetlessConfig,
    defaults_as_yaml,
    load_config,
    load_raw,
    parse_assignment,
)
from forgetless.errors import ForgetlessError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Adapt Hugging Face causal LMs to a domain or a task sequence without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)
data_app = typer.Typer(help="Built-in data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
mix_app = typer.Typer(
    help="Data mixtures (CLIMB): cluster a pool, search weights.", no_args_is_help=True
)
app.add_typer(mix_app, name="mix")
lm_eval_app = typer.Typer(
    help="lm-evaluation-harness both ways: export our tasks, run lm-eval tasks on our models.",
    no_args_is_help=True,
)
app.add_typer(lm_eval_app, name="lm-eval")

err = Console(stderr=True)
# Where results go: the real standard output. While a command runs, everything else printed
# there (the Trainer's log dicts, library messages) is sent to stderr, so stdout holds only
# the result: a table, or valid JSON with --json.
_results: dict[str, Any] = {"stream": None}


def _out() -> Console:
    return Console(file=_results["stream"] or sys.stdout)


def _emit(data: Any, show: Callable[[], None] | None = None, as_json: bool = False) -> None:
    """The command's result: JSON with --json (or when there is no human form), else ``show``."""
    if as_json or show is None:
        stream = _results["stream"] or sys.stdout
        stream.write(json.dumps(data, indent=2, default=str) + "\n")
        stream.flush()
    else:
        show()


def _logs_to_stderr(command: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(command)  # typer reads the wrapped signature for the options
    def run(*args: Any, **kwargs: Any) -> None:
        _results["stream"] = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                command(*args, **kwargs)
        finally:
            _results["stream"] = None

    return run


def _command(group: typer.Typer, name: str | None = None):
    def register(command: Callable[..., None]) -> Callable[..., None]:
        return group.command(name)(_logs_to_stderr(command))

    return register


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from forgetless import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers"))
    _out().print(f"forgetless {__version__} ({libraries})", markup=False, highlight=False)
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Adapt Hugging Face causal LMs to a domain or a task sequence without forgetting."""


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see `forgetless config`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field: section.key=value (repeatable)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (logs stay on stderr).")
]
RunDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output-dir",
        "-o",
        help="Run directory: finished stages are cached there. [default: run_dir of the config]",
    ),
]


# Config keys set by a flag whose name is not the key's last part.
FLAG_NAMES = {
    "model.name": "--model",
    "data.source": "--data",
    "data.revision": "--data-revision",
    "select.anchor.source": "--anchor",
    "run_dir": "--output-dir",
}


def _flag(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def _setting(key: str) -> FieldInfo:
    section: Any = ForgetlessConfig
    for part in key.split("."):
        field = section.model_fields[part]
        section = field.annotation
    return field


def _fixed_choices(key: str) -> tuple[str, ...]:
    family = key.removesuffix(".method")
    if family != key and family in METHOD_SECTIONS:
        return registry.names(family)
    annotation = _setting(key).annotation
    for member in (annotation, *get_args(annotation)):
        if get_origin(member) is Literal:
            return tuple(str(choice) for choice in get_args(member))
    return ()


def _default_text(key: str, defaults: dict[str, Any] | None) -> str | bool:
    if defaults is not None and key in defaults:
        value = defaults[key]
    else:
        value = _setting(key).get_default(call_default_factory=True)
    if value is None or value == [] or value == {}:
        return False
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _option(key: str, help: str, *, defaults: dict[str, Any] | None = None, **kwargs: Any):
    """A flag that sets config ``key``: help with its choices (from the method registry or
    the schema's Literal) and its default (the schema's, or ``defaults``, dotted keys)."""
    choices = _fixed_choices(key)
    return typer.Option(
        help=help,
        metavar=f"[{'|'.join(choices)}]" if choices else None,
        show_default=_default_text(key, defaults),
        **kwargs,
    )


DataDirOpt = Annotated[
    str | None,
    typer.Option(
        help="Data directory. [default: $FORGETLESS_DATA_DIR, then the user cache]",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    _option(
        "model.name",
        "Hub id, local checkpoint, or alias (smollm2-135m, tiny-llama, random:<shape>).",
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Upload the model and its card to this hub repository (checked before any work).",
    ),
]
PrivateOpt = Annotated[bool, typer.Option(help="Create the --push-to-hub repository as private.")]
DataRevisionOpt = Annotated[
    str | None, _option("data.revision", "Branch, tag or commit of a hub data set.")
]
RevisionOpt = Annotated[
    str | None, _option("model.revision", "Branch, tag or commit of a hub model.")
]


def _overrides(
    assignments: list[str] | None, flags: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config overrides of ``--set`` and the flags, and which option set each key."""
    overrides = dict(parse_assignment(text) for text in assignments or [])
    labels = {key: f"--set {key}" for key in overrides}
    # An unset flag must not erase a value given with --set.
    given = {key: value for key, value in flags.items() if value is not None}
    overrides.update(given)
    labels.update({key: _flag(key) for key in given})
    return overrides, labels


def _config(path: Path | None, assignments: list[str] | None, flags: dict[str, Any]):
    overrides, labels = _overrides(assignments, flags)
    return load_config(path, overrides, labels)


def _split_tasks(tasks: str | None) -> list[str] | None:
    if tasks is None:
        return None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ForgetlessError("--tasks needs at least one task name")
    return names


def _format_optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _print_markdown(path: Path) -> None:
    # Tables must stay one row per line whatever the terminal width.
    _out().print(path.read_text(), markup=False, highlight=False, soft_wrap=True)


def _print_table(table: Table) -> None:
    # A terminal folds cells to its width; piped output (docs, grep) keeps one row per line.
    console = _out()
    (console if console.is_terminal else Console(file=console.file, width=250)).print(table)


def _check_push(repo: str | None, private: bool) -> None:
    """Before any work: a push that cannot happen must not cost a training run first."""
    if repo is None:
        if private:
            raise ForgetlessError("--private applies to --push-to-hub REPO, which is not given")
        return
    from forgetless.hub import check_push_access

    check_push_access(repo)


def _print_fields(summary: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key, value in summary.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    _print_table(table)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _stage_event(event: str, info: Any) -> None:
    if event == "start":
        err.print(f"[bold]▶ {info}[/bold]")
    elif event == "cached":
        err.print(f"[dim]✓ {info.name} (cached in {info.directory})[/dim]")
    elif event == "done":
        err.print(f"[green]✓ {info.name}[/green] → {info.directory}")
    elif event == "pushed":
        err.print(f"pushed → {info}", markup=False)


@_command(app)
def train(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where checkpoints and the model go.")
    ],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    data: Annotated[
        str | None, _option("data.source", "Data set name, file, or hub data set id.")
    ] = None,
    kind: Annotated[str | None, _option("data.kind", "How to read the records.")] = None,
    split: Annotated[str | None, _option("data.split", "Split of the data set.")] = None,
    limit: Annotated[int | None, _option("data.limit", "Use the first N records.")] = None,
    data_revision: DataRevisionOpt = None,
    method: Annotated[str | None, _option("train.method", "Training method.")] = None,
    learning_rate: Annotated[
        float | None, _option("train.learning_rate", "Peak learning rate.")
    ] = None,
    max_steps: Annotated[int | None, _option("train.max_steps", "Optimizer steps.")] = None,
    batch_size: Annotated[
        int | None, _option("train.batch_size", "Sequences per micro-batch.")
    ] = None,
    max_length: Annotated[int | None, _option("train.max_length", "Tokens per sequence.")] = None,
    seed: Annotated[int | None, _option("train.seed", "Random seed.")] = None,
    report_to: Annotated[
        list[str] | None,
        _option("train.report_to", "Experiment tracker: tensorboard, wandb, trackio, ..."),
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
    cfg = _config(
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
    _check_push(push_to_hub, private)
    records = load_section(cfg.data, cfg.data_dir)
    if overwrite:
        remove_run(output_dir)
    summary = train_into(
        settings, records, output_dir, cfg.data_dir, push_to_hub=push_to_hub, private=private
    )
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun / accelerate launch
        _emit(summary, lambda: _print_fields(summary), json_)


@_command(app, "eval")
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
        int | None, _option("evaluate.limit", "Evaluate the first N items per task.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Also write the metrics to this JSON file.")
    ] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate a model: multiple-choice accuracy, perplexity, GSM8K exact match."""
    cfg = _config(
        config,
        set_,
        {
            "model.name": model,
            "model.revision": revision,
            "evaluate.limit": limit,
            "data_dir": data_dir,
        },
    )
    task_names = _split_tasks(tasks) or [*cfg.evaluate.domain_tasks, *cfg.evaluate.general_tasks]
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
                _format_optional(result.details.get("accuracy_norm")),
                str(result.n),
                f"{result.seconds:.0f}",
            )
        _out().print(table)

    _emit(metrics, show, json_)


@_command(app)
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
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ForgetlessError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None

    built = build_retention_report(
        read(base_metrics),
        read(adapted_metrics),
        _split_tasks(domain_tasks) or [],
        _split_tasks(general_tasks) or [],
    )
    write_report(built, output_dir)
    _emit(built, lambda: _print_markdown(output_dir / "report.md"), json_)


@_command(app)
def run(
    config: ConfigOpt = None,
    output_dir: RunDirOpt = None,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run a recipe: base evaluation, mix/select/train or experts + merge, retention report.

    `recipe.steps` picks the steps between the two evaluations (docs/recipes.md). Finished
    stages are cached in the run directory; an interrupted run resumes.
    """
    cfg = _config(config, set_, {"run_dir": output_dir, "data_dir": data_dir})
    if cfg.compare.arms:
        raise ForgetlessError(
            f"{config} defines compare.arms: run it with `forgetless compare --config {config}`"
        )
    cfg.train.check_trackers_installed()
    _check_push(push_to_hub, private)
    from forgetless.recipes.adapt import run_adapt

    results = run_adapt(cfg, on_event=_stage_event, push_to_hub=push_to_hub, private=private)
    directory = results["report"].directory
    _emit(
        _read_json(directory / "report.json"),
        lambda: _print_markdown(directory / "report.md"),
        json_,
    )
    err.print(f"report files: {directory}")


@_command(app)
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config with compare.arms.")],
    output_dir: RunDirOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Compare arms on one base, data and items: the frontier of gain, retention, compute.

    Writes the frontier report (JSON, Markdown, self-contained HTML). Stages the arms share
    (the base evaluation, clusters, gradients) run once; an arm may sweep one setting. An
    interrupted comparison resumes.
    """
    _compare(config, set_, {"run_dir": output_dir, "data_dir": data_dir}, json_)


@_command(app)
def demo(
    output_dir: RunDirOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Plain fine-tuning of SmolLM2-135M against the recipe forgetless recommends.

    Same data and tokens for both; prints the side-by-side table and writes the HTML frontier
    report (src/forgetless/configs/demo.yaml)."""
    demo_file = resources.files("forgetless") / "configs" / "demo.yaml"
    with resources.as_file(demo_file) as path:
        _compare(path, set_, {"run_dir": output_dir, "data_dir": data_dir}, json_)


def _compare(
    path: Path, assignments: list[str] | None, flags: dict[str, Any], as_json: bool
) -> None:
    from forgetless.recipes.compare import compare as run_comparison
    from forgetless.recipes.compare import expand_arms

    overrides, _ = _overrides(assignments, flags)
    raw = load_raw(path, overrides)
    arms = expand_arms(raw, path)
    for arm in arms:
        arm.config.train.check_trackers_installed()
    run_dir = arms[0].config.run_dir
    directory = run_comparison(arms, run_dir, on_event=_stage_event).directory
    _emit(
        _read_json(directory / "frontier.json"),
        lambda: _print_markdown(directory / "frontier.md"),
        as_json,
    )
    err.print(f"frontier report: {directory / 'frontier.html'}")


@_command(app, "methods")
def methods(
    family: Annotated[
        str | None,
        typer.Argument(
            help="Only this family.", metavar=f"[{'|'.join(registry.FAMILIES)}]", show_default=False
        ),
    ] = None,
    markdown: Annotated[bool, typer.Option(help="Print Markdown tables (as in the docs).")] = False,
    json_: JsonOpt = False,
) -> None:
    """List the registered methods: what each does, consumes, produces; its settings."""
    families = list(registry.FAMILIES)
    if family is not None:
        if family not in registry.FAMILIES:
            raise ForgetlessError(
                f"unknown method family {family!r}; choose one of: {', '.join(families)}"
            )
        families = [family]
    listed = registry.methods(families)

    def show() -> None:
        if markdown:
            blocks = [
                f"### {name}: {registry.FAMILIES[name]}\n\n{registry.markdown_table(name)}"
                for name in families
            ]
            _out().print("\n\n".join(blocks), markup=False, highlight=False, soft_wrap=True)
            return
        table = Table()
        for column in ("family", "method", "what it does", "consumes", "produces", "settings"):
            table.add_column(column, overflow="fold")
        for method in listed:
            table.add_row(
                method.family,
                method.name,
                method.summary,
                method.consumes,
                method.produces,
                method.settings or "",
            )
        _print_table(table)

    rows = [
        {
            "family": method.family,
            "name": method.name,
            "summary": method.summary,
            "consumes": method.consumes,
            "produces": method.produces,
            "settings": method.settings,
        }
        for method in listed
    ]
    _emit(rows, show, json_)


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
    _option, defaults=_packaged_defaults("continual_fewshot.yaml")
)


@_command(app)
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
        cfg = _config(config or default, set_, flags)
    from forgetless.recipes.continual import run_continual

    results = run_continual(cfg, on_event=_stage_event)
    directory = results["report"].directory
    _emit(
        _read_json(directory / "continual.json"),
        lambda: _print_markdown(directory / "continual.md"),
        json_,
    )
    err.print(f"report files: {directory}")


@_command(app)
def merge(
    base: Annotated[str, typer.Option(help="Base checkpoint the experts were fine-tuned from.")],
    experts: Annotated[
        list[str],
        typer.Option(
            help="Expert checkpoints or PEFT LoRA adapter folders: --experts E1 E2 ... "
            "(safetensors)."
        ),
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Directory for the merged checkpoint.")
    ],
    method: Annotated[str | None, _option("merge.method", "Merge method.")] = None,
    keep: Annotated[
        float | None, _option("merge.keep", "Fraction of each delta kept (sotu, dare, ties).")
    ] = None,
    rescale: Annotated[
        bool | None,
        typer.Option(
            "--rescale/--no-rescale",
            help="Divide kept entries by keep. [default: dare only]",
            show_default=False,
        ),
    ] = None,
    scale: Annotated[
        float | None, _option("merge.scale", "Multiplier of the merged delta.")
    ] = None,
    masks: Annotated[
        str | None,
        _option("merge.masks", "Random masks drawn per expert, or a disjoint partition."),
    ] = None,
    weights: Annotated[
        list[float] | None, _option("merge.weights", "One weight per expert: --weights W1 W2 ...")
    ] = None,
    densities: Annotated[
        list[float] | None,
        _option("merge.densities", "One keep per expert: --densities D1 D2 ..."),
    ] = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize",
            help="Divide the merged delta by the sum of the weights (the experts' average).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int | None, _option("merge.seed", "Seed of the random masks.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    push_to_hub: PushOpt = None,
    private: PrivateOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Merge fine-tuned experts into their base: sparse random masks (SoTU) or a baseline.

    Streams tensor by tensor (memory stays near one model whatever the number of experts)
    and writes a plain HF checkpoint plus merge_report.json; the same seed gives the same bytes.
    """
    cfg = _config(
        config,
        set_,
        {
            "merge.method": method,
            "merge.keep": keep,
            "merge.rescale": rescale,
            "merge.scale": scale,
            "merge.seed": seed,
            "merge.masks": masks,
            "merge.weights": weights,
            "merge.densities": densities,
            "merge.normalize": normalize,
        },
    )
    _check_push(push_to_hub, private)
    from forgetless.merge import merge_checkpoints

    report = merge_checkpoints(
        base,
        experts,
        output_dir,
        cfg.merge,
        overwrite=overwrite,
        push_to_hub=push_to_hub,
        private=private,
    )
    overlap = report.overlap

    def show() -> None:
        table = Table(title=f"{report.method} merge of {len(experts)} experts → {output_dir}")
        for column in ("expert", "delta norm", "kept", "cosine to the others: raw→masked"):
            table.add_column(column)
        for index, name in enumerate(experts):
            cosines = [
                f"{overlap['cosine_raw'][index][other]:+.3f}→"
                f"{overlap['cosine_masked'][index][other]:+.3f}"
                for other in range(len(experts))
                if other != index
            ]
            table.add_row(
                name,
                f"{overlap['delta_norm'][index]:.4g}",
                f"{overlap['kept_fraction'][index]:.3f}",
                " ".join(cosines),
            )
        _out().print(table)

    _emit(report.to_dict(), show, json_)
    expected = report.expected_collision_rate
    err.print(
        f"collision rate {overlap['collision_rate']:.4f}"
        + (f" (independent masks: {expected:.4f})" if expected is not None else "")
        + f"; report: {output_dir / 'merge_report.json'}"
    )
    if report.hub_url:
        err.print(f"pushed → {report.hub_url}", markup=False)


@_command(app)
def select(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Run directory (stages are cached there).")
    ],
    method: Annotated[str | None, _option("select.method", "Selection method.")] = None,
    budget: Annotated[
        float | None, _option("select.budget", "Fraction of the pool to select.")
    ] = None,
    budget_tokens: Annotated[
        int | None,
        _option("select.budget_tokens", "Select up to this many training tokens instead."),
    ] = None,
    data: Annotated[
        str | None, _option("data.source", "Pool: data set name, file, or hub data set id.")
    ] = None,
    kind: Annotated[str | None, _option("data.kind", "How to read the pool's records.")] = None,
    split: Annotated[str | None, _option("data.split", "Split of the pool data set.")] = None,
    limit: Annotated[int | None, _option("data.limit", "Use the first N pool records.")] = None,
    data_revision: DataRevisionOpt = None,
    anchor: Annotated[
        str | None, _option("select.anchor.source", "General-knowledge anchor data.")
    ] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    seed: Annotated[int | None, _option("select.seed", "Seed of every random choice.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Select training data whose gradients help the domain but stay clear of the anchor's.

    Writes OUTPUT_DIR/selection_METHOD/selected.jsonl (records, rank, score; trainable with
    `forgetless train --data`), summary.json and histograms.png. Interrupted runs resume, and
    methods run into the same OUTPUT_DIR share its gradients.
    """
    cfg = _config(
        config,
        set_,
        {
            "select.method": method,
            "select.budget": budget,
            "select.budget_tokens": budget_tokens,
            "select.anchor.source": anchor,
            "select.seed": seed,
            "data.source": data,
            "data.kind": kind,
            "data.split": split,
            "data.limit": limit,
            "data.revision": data_revision,
            "model.name": model,
            "model.revision": revision,
            "data_dir": data_dir,
        },
    )
    from forgetless.select import run_selection

    results = run_selection(cfg, output_dir, on_event=_stage_event)
    selection = results[f"selection_{cfg.select.method}"]
    summary = selection.summary

    def show() -> None:
        title = f"{summary['method']}: {summary['selected']} of {summary['pool']} records"
        table = Table(title=title)
        for column in ("metric", "pool mean", "selected mean"):
            table.add_column(column)
        for name, values in summary.get("gradient_metrics", {}).items():
            if isinstance(values, dict):
                selected = values["selected_mean"]
                table.add_row(
                    name,
                    f"{values['pool_mean']:.4f}",
                    "" if selected is None else f"{selected:.4f}",
                )
        if table.rows:
            _out().print(table)

    _emit(summary, show, json_)
    err.print(f"selected records: {selection.directory / 'selected.jsonl'}")


MixDirOpt = Annotated[
    Path,
    typer.Option(
        "--output-dir", "-o", help="Run directory of the mix stages (cluster, search, sample)."
    ),
]
SourcesOpt = Annotated[
    list[str] | None,
    _option("mix.sources", "Pool sources: --sources c4 pubmedqa@train ... (names or files)."),
]


@_command(mix_app, "cluster")
def mix_cluster(
    output_dir: MixDirOpt,
    sources: SourcesOpt = None,
    clusters: Annotated[int | None, _option("mix.cluster.clusters", "k of the k-means.")] = None,
    limit_per_source: Annotated[
        int | None, _option("mix.limit_per_source", "Use at most N documents per source.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Embed a pool, k-means it, prune low-quality clusters, merge the rest (Ward).

    Writes OUTPUT_DIR/clusters/report.md (sizes, sources, top terms, examples), report.json,
    assignments.csv and clustering.npz. Embeddings are cached per shard; reruns resume.
    """
    cfg = _config(
        config,
        set_,
        {
            "mix.sources": sources,
            "mix.cluster.clusters": clusters,
            "mix.limit_per_source": limit_per_source,
            "data_dir": data_dir,
        },
    )
    from forgetless.mix import run_clustering

    results = run_clustering(cfg, output_dir, on_event=_stage_event)
    directory = results["clusters"].directory
    _emit(
        _read_json(directory / "report.json"),
        lambda: _print_markdown(directory / "report.md"),
        json_,
    )


@_command(mix_app, "search")
def mix_search(
    output_dir: MixDirOpt,
    sources: SourcesOpt = None,
    rounds: Annotated[
        str | None,
        _option("mix.search.rounds", "Proxy runs per round, comma-separated (e.g. 64,32,16)."),
    ] = None,
    propose_only: Annotated[
        bool,
        typer.Option(
            help="Write the next round's mixtures to search/mixtures.csv and stop; add their "
            "rows to search/metrics.csv (run elsewhere) and rerun."
        ),
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Search mixture weights over the super-clusters with proxy models and a predictor.

    Clusters first (cached), then runs or resumes the rounds; the result is
    OUTPUT_DIR/search/mixture.json. Each proxy run is cached by its mixture's hash.
    """
    round_counts = None
    if rounds is not None:
        try:
            round_counts = [int(part) for part in rounds.split(",") if part.strip()]
        except ValueError:
            raise ForgetlessError(
                f"--rounds expects comma-separated integers, got {rounds!r}"
            ) from None
    cfg = _config(
        config,
        set_,
        {"mix.sources": sources, "mix.search.rounds": round_counts, "data_dir": data_dir},
    )
    from forgetless.mix import run_mixture_search

    outcome = run_mixture_search(cfg, output_dir, propose_only=propose_only, on_event=_stage_event)
    if outcome["status"] == "waiting":
        _emit(outcome, lambda: None, json_)
        err.print(
            f"round {outcome['round'] + 1}: {len(outcome['pending'])} mixtures await proxy "
            f"results in {output_dir / 'search' / 'metrics.csv'}"
        )
        return

    def show() -> None:
        table = Table(title="mixture search")
        for column in ("round", "runs", "best objective", "mean objective", "predictor Spearman"):
            table.add_column(column)
        for entry in outcome["rounds"]:
            spearman = entry.get("spearman_held_out")
            table.add_row(
                str(entry["round"]),
                str(entry["runs"]),
                f"{entry['best_objective']:.4f}",
                f"{entry['mean_objective']:.4f}",
                "" if spearman is None else f"{spearman:+.2f}",
            )
        _out().print(table)

    _emit(outcome, show, json_)
    weights = ", ".join(f"{w:.3f}" for w in outcome["final"]["weights"])
    err.print(f"final mixture [{weights}] → {output_dir / 'search' / 'mixture.json'}")


@_command(mix_app, "sample")
def mix_sample(
    output_dir: MixDirOpt,
    tokens: Annotated[int, typer.Option(help="Tokens to draw (the config model's tokenizer).")],
    output: Annotated[Path, typer.Option(help="The jsonl file to write.")],
    sources: SourcesOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write a training set of TOKENS tokens drawn from the pool by the searched mixture."""
    if tokens < 1:
        raise ForgetlessError("--tokens must be positive")
    cfg = _config(config, set_, {"mix.sources": sources, "data_dir": data_dir})
    from forgetless.mix import materialise_mixture

    summary = materialise_mixture(cfg, output_dir, tokens, output)
    _emit(summary, lambda: _print_fields(summary), json_)


@_command(lm_eval_app, "export")
def lm_eval_export(
    tasks: Annotated[
        str, typer.Option(help="Comma-separated forgetless tasks, as for `forgetless eval`.")
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Folder for the task configs and items.")
    ],
    limit: Annotated[
        int | None, _option("evaluate.limit", "Export the first N items per task.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write our tasks as lm-eval task configs reading the very items forgetless scores.

    One jsonl and one YAML per task plus the group `forgetless_retention`; lm-eval then runs
    them with `--include_path OUTPUT_DIR` (docs/lm_eval.md)."""
    cfg = _config(config, set_, {"evaluate.limit": limit, "data_dir": data_dir})
    from forgetless.evaluate.lm_eval import export_tasks

    written = export_tasks(_split_tasks(tasks) or [], cfg.evaluate, output_dir, cfg.data_dir)
    paths = [str(path) for path in written]
    _emit(paths, lambda: _out().print("\n".join(paths), markup=False, highlight=False), json_)
    err.print(
        f"run them: forgetless lm-eval run --model M --include-path {output_dir} "
        "--tasks forgetless_retention"
    )


@_command(lm_eval_app, "run")
def lm_eval_run(
    model: Annotated[
        str,
        typer.Option(
            help="A `forgetless run` directory (its adapted model), checkpoint, alias or hub id."
        ),
    ],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval task names.")],
    include_path: Annotated[
        Path | None, typer.Option(help="Folder of extra task configs (`lm-eval export`).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score the first N items of every task.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size.")] = 1,
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit of a hub model.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate a forgetless model with lm-evaluation-harness tasks (offline)."""
    from forgetless.evaluate.lm_eval import run_lm_eval

    task_names = _split_tasks(tasks) or []
    result = run_lm_eval(
        model,
        task_names,
        include_path=include_path,
        limit=limit,
        batch_size=batch_size,
        revision=revision,
    )

    def show() -> None:
        table = Table(title=f"lm-eval {result['lm_eval_version']}: {result['resolved_model']}")
        for column in ("task", "metric", "value", "stderr", "n"):
            table.add_column(column)
        for task, metrics in result["results"].items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr") or not isinstance(value, int | float):
                    continue
                stderr = metrics.get(f"{metric}_stderr")
                table.add_row(
                    task,
                    metric,
                    f"{value:.4f}",
                    f"{stderr:.4f}" if isinstance(stderr, int | float) else "",
                    str(result["n_samples"].get(task, "")),
                )
        _out().print(table)

    _emit(result, show, json_)


@_command(app, "config")
def show_config() -> None:
    """Print the default configuration as commented YAML."""
    # No wrapping: a wrapped comment would lose its '#' and the output would not load.
    _out().print(defaults_as_yaml(), markup=False, highlight=False, soft_wrap=True)


@_command(data_app, "list")
def data_list(
    records: Annotated[
        bool, typer.Option("--records", help="Load every data set and count its records.")
    ] = False,
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List the built-in data sets: kinds, splits, size, license and terms of use.

    Terms flag the sets whose license limits use (research only, non-commercial, share-alike).
    `--records` counts the records of every split in the native kind (a minute or two);
    `forgetless data info NAME` describes one set.
    """
    from tqdm.auto import tqdm

    from forgetless.data import DATASETS, split_sizes

    rows = []
    for spec in tqdm(DATASETS.values(), desc="counting records", disable=not records):
        row = {
            "name": spec.name,
            "kinds": list(spec.kinds),
            "splits": list(spec.splits),
            "mib": round(spec.size_bytes / 2**20, 1),
            "license": spec.licenses,
            "terms": spec.terms,
        }
        if records:
            row["records"] = split_sizes(spec.name, data_dir=data_dir)
        rows.append(row)

    def show() -> None:
        table = Table()
        columns = ["name", "kinds", "splits", "MiB", "license", "terms"]
        for column in [*columns, *(["records"] if records else [])]:
            table.add_column(column, overflow="fold")
        for row in rows:
            cells = [
                row["name"],
                ", ".join(row["kinds"]),
                ", ".join(row["splits"]),
                f"{row['mib']:.1f}",
                row["license"],
                row["terms"],
            ]
            if records:
                cells.append(", ".join(f"{split} {n:,}" for split, n in row["records"].items()))
            table.add_row(*cells)
        _print_table(table)

    _emit(rows, show, json_)


@_command(data_app, "info")
def data_info(
    name: Annotated[str, typer.Argument(help="A data set name from `forgetless data list`.")],
    data_dir: DataDirOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Describe one data set: sources, license, terms, kinds, and records per split."""
    from forgetless.data import get_dataset_spec, split_sizes

    spec = get_dataset_spec(name)
    sizes = split_sizes(name, data_dir=data_dir)
    info = {
        "name": spec.name,
        "description": spec.description,
        "kinds": list(spec.kinds),
        "native_kind": spec.native_kind,
        "license": spec.licenses,
        "terms": spec.terms,
        "files": len(spec.all_files()),
        "mib": round(spec.size_bytes / 2**20, 1),
        "records": sizes,
    }
    lines = [
        f"{spec.name}: {spec.description}",
        f"kinds: {', '.join(spec.kinds)} (native: {spec.native_kind})",
        f"license: {spec.licenses}" + (f"; terms: {spec.terms}" if spec.terms else ""),
        f"files: {info['files']} ({info['mib']:.1f} MiB)",
        *(f"{split}: {count:,} records" for split, count in sizes.items()),
    ]
    text = "\n".join(lines)
    _emit(info, lambda: _out().print(text, markup=False, highlight=False, soft_wrap=True), json_)


def _command_names() -> list[str]:
    """Every command and sub-command, as typed after `forgetless`."""

    def name(info) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    names = [name(info) for info in app.registered_commands]
    for group in app.registered_groups:
        names += [f"{group.name} {name(info)}" for info in group.typer_instance.registered_commands]
    return names


def _is_usage_error(error: Exception) -> bool:
    # Typer vendors its own copy of click, so match click's exception interface rather than
    # one particular class.
    return hasattr(error, "format_message") and hasattr(error, "exit_code")


# Options that take several values after one flag (`--experts A B C`), which click cannot
# parse natively; they are rewritten to the repeated form click understands.
MULTI_VALUE_OPTIONS = ("--experts", "--sources", "--weights", "--densities")


def _expand_multi_value_options(argv: list[str]) -> list[str]:
    expanded: list[str] = []
    current: str | None = None
    for token in argv:
        if token.startswith("-"):
            current = token if token in MULTI_VALUE_OPTIONS else None
            if current is None:
                expanded.append(token)
            continue
        if current is not None:
            expanded.extend([current, token])
        else:
            expanded.append(token)
    return expanded


# Output flags renamed to one scheme (--output-dir for folders, --output for files); the old
# spellings get a message instead of click's "no such option".
RENAMED_FLAGS = {
    **{
        command: {"--run-dir": "--output-dir"}
        for command in ("run", "compare", "demo", "continual")
    },
    **{
        command: {"--output": "--output-dir"}
        for command in ("merge", "select", "mix cluster", "mix search")
    },
    "mix sample": {"--to": "--output (and the run directory is --output-dir)"},
}


def _check_renamed_flags(argv: list[str]) -> None:
    leading = list(itertools.takewhile(lambda token: not token.startswith("-"), argv))
    two_words = " ".join(leading[:2])
    renamed = RENAMED_FLAGS.get(two_words) or RENAMED_FLAGS.get(" ".join(leading[:1]), {})
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in renamed:
            raise ForgetlessError(f"{flag} was renamed {renamed[flag]}")


def main(argv: list[str] | None = None) -> None:
    argv = _expand_multi_value_options(sys.argv[1:] if argv is None else list(argv))
    try:
        _check_renamed_flags(argv)
        app(args=argv, standalone_mode=False)
    except ForgetlessError as error:
        # One line whatever a library put in the message it wraps.
        message = " ".join(str(error).split())
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted; rerun the same command to resume", markup=False)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except OSError as error:
        # A path that cannot be written or read (permissions, a full disk, a file where a
        # folder should be) is the user's to fix; anything else keeps its traceback.
        if error.filename is None:
            raise
        err.print(
            f"error: {error.filename}: {error.strerror or error}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except Exception as error:
        if not _is_usage_error(error):
            raise
        message = " ".join(error.format_message().split())
        if message:  # empty when click has just shown the help of a bare command group
            err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


COMMAND_NAMES = _command_names()

if __name__ == "__main__":
    main()
