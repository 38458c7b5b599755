"""The ``forgetless`` command line: a thin layer over the Python API.

Every command reads the one config schema (``--config file.yaml``), lets its flags and
``--set section.key=value`` override it, and reports user mistakes as one line on stderr with
exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from forgetless import registry
from forgetless.config import defaults_as_yaml, load_config, load_raw, parse_assignment
from forgetless.errors import ForgetlessError

app = typer.Typer(
    help="Adapt Hugging Face causal LMs to a domain or a task sequence without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Built-in data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
mix_app = typer.Typer(
    help="Data mixtures (CLIMB): cluster a pool, search weights.", no_args_is_help=True
)
app.add_typer(mix_app, name="mix")

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see `forgetless config`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field: section.key=value (repeatable)."),
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(help="Data directory (default: $FORGETLESS_DATA_DIR, then the user cache)."),
]
ModelOpt = Annotated[
    str | None, typer.Option(help="Hub id, local checkpoint, or alias (smollm2-135m, tiny-llama).")
]


# Config keys set by a flag whose name is not the key's last part.
FLAG_NAMES = {"model.name": "--model", "data.source": "--data", "select.anchor.source": "--anchor"}


def _flag(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


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


def _choices(family: str) -> str:
    return ", ".join(registry.names(family))


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
    out.print(path.read_text(), markup=False, highlight=False, soft_wrap=True)


def _stage_event(event: str, info: Any) -> None:
    if event == "start":
        err.print(f"[bold]▶ {info}[/bold]")
    elif event == "cached":
        err.print(f"[dim]✓ {info.name} (cached in {info.directory})[/dim]")
    elif event == "done":
        err.print(f"[green]✓ {info.name}[/green] → {info.directory}")


@app.command()
def train(
    output_dir: Annotated[Path, typer.Option(help="Where checkpoints and the model go.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    data: Annotated[str | None, typer.Option(help="Data set name or file.")] = None,
    kind: Annotated[str | None, typer.Option(help="text, instruction or multiple_choice.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of the data set.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N records.")] = None,
    method: Annotated[
        str | None, typer.Option(help=f"Training method: {_choices('train')}.")
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a training run of other settings in OUTPUT_DIR.")
    ] = False,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a model (full, LoRA or OSFT); resumes from the last checkpoint in OUTPUT_DIR.

    Run again when finished, it changes nothing; another run in the same OUTPUT_DIR is refused
    unless --overwrite."""
    cfg = _config(
        config,
        set_,
        {
            "model.name": model,
            "data.source": data,
            "data.kind": kind,
            "data.split": split,
            "data.limit": limit,
            "train.method": method,
            "train.learning_rate": learning_rate,
            "train.max_steps": max_steps,
            "train.batch_size": batch_size,
            "train.max_length": max_length,
            "train.seed": seed,
            "data_dir": data_dir,
        },
    )
    from forgetless.data import load_section
    from forgetless.train.sft import remove_run
    from forgetless.train.stages import TrainSettings, train_into

    settings = TrainSettings(model=cfg.model, data=cfg.data, data_file=None, train=cfg.train)
    records = load_section(cfg.data, cfg.data_dir)
    if overwrite:
        remove_run(output_dir)
    summary = train_into(settings, records, output_dir, cfg.data_dir)
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun / accelerate launch
        out.print_json(data=summary)


@app.command("eval")
def evaluate(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks, e.g. arc_easy,piqa,c4,gsm8k,ppl:pubmedqa."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N items per task.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the metrics as JSON here.")] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model: multiple-choice accuracy, perplexity, GSM8K exact match."""
    cfg = _config(
        config, set_, {"model.name": model, "evaluate.limit": limit, "data_dir": data_dir}
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
    out.print(table)


@app.command()
def report(
    base_metrics: Annotated[Path, typer.Option(help="metrics.json of the base model.")],
    adapted_metrics: Annotated[Path, typer.Option(help="metrics.json of the adapted model.")],
    domain_tasks: Annotated[str, typer.Option(help="Comma-separated domain tasks.")],
    general_tasks: Annotated[str, typer.Option(help="Comma-separated general tasks.")],
    output_dir: Annotated[Path, typer.Option(help="Where report.{json,md,png} go.")],
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
    _print_markdown(output_dir / "report.md")


@app.command()
def run(
    config: ConfigOpt = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory (cached stages).")] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a recipe: base evaluation, mix/select/train or experts + merge, retention report.

    `recipe.steps` picks the steps between the two evaluations (docs/recipes.md). Finished
    stages are cached in the run directory; an interrupted run resumes.
    """
    cfg = _config(config, set_, {"run_dir": run_dir, "data_dir": data_dir})
    if cfg.compare.arms:
        raise ForgetlessError(
            f"{config} defines compare.arms: run it with `forgetless compare --config {config}`"
        )
    from forgetless.recipes.adapt import run_adapt

    results = run_adapt(cfg, on_event=_stage_event)
    _print_markdown(results["report"].directory / "report.md")
    err.print(f"report files: {results['report'].directory}")


@app.command()
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config with compare.arms.")],
    run_dir: Annotated[str | None, typer.Option(help="Run directory (cached stages).")] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compare arms on one base, data and items: the frontier of gain, retention, compute.

    Writes the frontier report (JSON, Markdown, self-contained HTML). Stages the arms share
    (the base evaluation, clusters, gradients) run once; an arm may sweep one setting. An
    interrupted comparison resumes.
    """
    _compare(config, set_, {"run_dir": run_dir, "data_dir": data_dir})


@app.command()
def demo(
    run_dir: Annotated[str | None, typer.Option(help="Run directory.")] = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Plain fine-tuning of SmolLM2-135M against the recipe forgetless recommends.

    Same data and tokens for both; prints the side-by-side table and writes the HTML frontier
    report (src/forgetless/configs/demo.yaml)."""
    demo_file = resources.files("forgetless") / "configs" / "demo.yaml"
    with resources.as_file(demo_file) as path:
        _compare(path, set_, {"run_dir": run_dir, "data_dir": data_dir})


def _compare(path: Path, assignments: list[str] | None, flags: dict[str, Any]) -> None:
    from forgetless.recipes.compare import compare as run_comparison
    from forgetless.recipes.compare import expand_arms

    overrides, _ = _overrides(assignments, flags)
    raw = load_raw(path, overrides)
    arms = expand_arms(raw, path)
    run_dir = arms[0].config.run_dir
    directory = run_comparison(arms, run_dir, on_event=_stage_event).directory
    _print_markdown(directory / "frontier.md")
    err.print(f"frontier report: {directory / 'frontier.html'}")


@app.command("methods")
def methods(
    family: Annotated[
        str | None, typer.Argument(help=f"Only this family: {', '.join(registry.FAMILIES)}.")
    ] = None,
    markdown: Annotated[bool, typer.Option(help="Print Markdown tables (as in the docs).")] = False,
) -> None:
    """List the registered methods: what each does, consumes, produces; its settings."""
    families = list(registry.FAMILIES)
    if family is not None:
        if family not in registry.FAMILIES:
            raise ForgetlessError(
                f"unknown method family {family!r}; choose one of: {', '.join(families)}"
            )
        families = [family]
    if markdown:
        blocks = [
            f"### {name}: {registry.FAMILIES[name]}\n\n{registry.markdown_table(name)}"
            for name in families
        ]
        out.print("\n\n".join(blocks), markup=False, highlight=False, soft_wrap=True)
        return
    table = Table()
    for column in ("family", "method", "what it does", "consumes", "produces", "settings"):
        table.add_column(column, overflow="fold")
    for method in registry.methods(families):
        table.add_row(
            method.family,
            method.name,
            method.summary,
            method.consumes,
            method.produces,
            method.settings or "",
        )
    _print_table(table)


@app.command()
def continual(
    benchmark: Annotated[str | None, typer.Option(help="fewshot or olora.")] = None,
    order: Annotated[int | None, typer.Option(help="Task order: fewshot 1-3, olora 4-6.")] = None,
    method: Annotated[
        str | None, typer.Option(help=f"Continual strategy: {_choices('continual')}.")
    ] = None,
    subset: Annotated[
        str | None, typer.Option(help="fewshot seed split: 0_42, 1_142 or 2_242.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (default: continual_fewshot.yaml)."),
    ] = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory (cached stages).")] = None,
    data_dir: DataDirOpt = None,
    head: Annotated[
        str | None,
        typer.Option(help="lm (label log-likelihood) or closed_form (class-incremental head)."),
    ] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluate N items per task.")] = None,
    train_limit: Annotated[int | None, typer.Option(help="Train on N records per task.")] = None,
    set_: SetOpt = None,
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
        "run_dir": run_dir,
        "data_dir": data_dir,
    }
    packaged = resources.files("forgetless") / "configs" / "continual_fewshot.yaml"
    with resources.as_file(packaged) as default:
        cfg = _config(config or default, set_, flags)
    from forgetless.recipes.continual import run_continual

    results = run_continual(cfg, on_event=_stage_event)
    _print_markdown(results["report"].directory / "continual.md")
    err.print(f"report files: {results['report'].directory}")


@app.command()
def merge(
    base: Annotated[str, typer.Option(help="Base checkpoint the experts were fine-tuned from.")],
    experts: Annotated[
        list[str], typer.Option(help="Expert checkpoints: --experts E1 E2 ... (safetensors).")
    ],
    output: Annotated[Path, typer.Option(help="Directory for the merged checkpoint.")],
    method: Annotated[str | None, typer.Option(help=f"Merge method: {_choices('merge')}.")] = None,
    keep: Annotated[
        float | None, typer.Option(help="Fraction of each delta kept (sotu, dare, ties).")
    ] = None,
    rescale: Annotated[
        bool | None,
        typer.Option(
            "--rescale/--no-rescale", help="Divide kept entries by keep (default: dare only)."
        ),
    ] = None,
    scale: Annotated[float | None, typer.Option(help="Multiplier of the merged delta.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random masks.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
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
        },
    )
    from forgetless.merge import merge_checkpoints

    report = merge_checkpoints(base, experts, output, cfg.merge, overwrite=overwrite)
    overlap = report.overlap
    table = Table(title=f"{report.method} merge of {len(experts)} experts → {output}")
    for column in ("expert", "delta norm", "kept", "cosine to the others: raw→masked"):
        table.add_column(column)
    for index, name in enumerate(experts):
        cosines = [
            f"{overlap['cosine_raw'][index][other]:+.3f}→{overlap['cosine_masked'][index][other]:+.3f}"
            for other in range(len(experts))
            if other != index
        ]
        table.add_row(
            name,
            f"{overlap['delta_norm'][index]:.4g}",
            f"{overlap['kept_fraction'][index]:.3f}",
            " ".join(cosines),
        )
    out.print(table)
    expected = report.expected_collision_rate
    err.print(
        f"collision rate {overlap['collision_rate']:.4f}"
        + (f" (independent masks: {expected:.4f})" if expected is not None else "")
        + f"; report: {output / 'merge_report.json'}"
    )


@app.command()
def select(
    output: Annotated[Path, typer.Option(help="Run directory (stages are cached there).")],
    method: Annotated[
        str | None, typer.Option(help=f"Selection method: {_choices('select')}.")
    ] = None,
    budget: Annotated[float | None, typer.Option(help="Fraction of the pool to select.")] = None,
    data: Annotated[str | None, typer.Option(help="Pool: data set name or file.")] = None,
    kind: Annotated[str | None, typer.Option(help="text, instruction or multiple_choice.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of the pool data set.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N pool records.")] = None,
    anchor: Annotated[
        str | None, typer.Option(help="General-knowledge anchor data (default gsm8k).")
    ] = None,
    model: ModelOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Select training data whose gradients help the domain but stay clear of the anchor's.

    Writes OUTPUT/selection_METHOD/selected.jsonl (records, rank, score; trainable with
    `forgetless train --data`), summary.json and histograms.png. Interrupted runs resume, and
    methods run into the same OUTPUT share its gradients.
    """
    cfg = _config(
        config,
        set_,
        {
            "select.method": method,
            "select.budget": budget,
            "select.anchor.source": anchor,
            "select.seed": seed,
            "data.source": data,
            "data.kind": kind,
            "data.split": split,
            "data.limit": limit,
            "model.name": model,
            "data_dir": data_dir,
        },
    )
    from forgetless.select import run_selection

    results = run_selection(cfg, output, on_event=_stage_event)
    selection = results[f"selection_{cfg.select.method}"]
    summary = selection.summary
    table = Table(title=f"{summary['method']}: {summary['selected']} of {summary['pool']} records")
    for column in ("metric", "pool mean", "selected mean"):
        table.add_column(column)
    for name, values in summary.get("gradient_metrics", {}).items():
        if isinstance(values, dict):
            selected = values["selected_mean"]
            table.add_row(
                name, f"{values['pool_mean']:.4f}", "" if selected is None else f"{selected:.4f}"
            )
    if table.rows:
        out.print(table)
    err.print(f"selected records: {selection.directory / 'selected.jsonl'}")


@mix_app.command("cluster")
def mix_cluster(
    output: Annotated[Path, typer.Option(help="Run directory (stages are cached there).")],
    sources: Annotated[
        list[str] | None,
        typer.Option(help="Pool sources: --sources c4 pubmedqa@train ... (names or files)."),
    ] = None,
    clusters: Annotated[int | None, typer.Option(help="k of the k-means.")] = None,
    limit_per_source: Annotated[
        int | None, typer.Option(help="Use at most N documents per source.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Embed a pool, k-means it, prune low-quality clusters, merge the rest (Ward).

    Writes OUTPUT/clusters/report.md (sizes, sources, top terms, examples), report.json,
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

    results = run_clustering(cfg, output, on_event=_stage_event)
    _print_markdown(results["clusters"].directory / "report.md")


@mix_app.command("search")
def mix_search(
    output: Annotated[Path, typer.Option(help="Run directory of `mix cluster` (or a new one).")],
    sources: Annotated[
        list[str] | None, typer.Option(help="Pool sources, as for `mix cluster`.")
    ] = None,
    rounds: Annotated[
        str | None, typer.Option(help="Proxy runs per round, comma-separated (e.g. 64,32,16).")
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
) -> None:
    """Search mixture weights over the super-clusters with proxy models and a predictor.

    Clusters first (cached), then runs or resumes the rounds; the result is
    OUTPUT/search/mixture.json. Each proxy run is cached by its mixture's hash.
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

    outcome = run_mixture_search(cfg, output, propose_only=propose_only, on_event=_stage_event)
    if outcome["status"] == "waiting":
        err.print(
            f"round {outcome['round'] + 1}: {len(outcome['pending'])} mixtures await proxy "
            f"results in {output / 'search' / 'metrics.csv'}"
        )
        return
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
    out.print(table)
    weights = ", ".join(f"{w:.3f}" for w in outcome["final"]["weights"])
    err.print(f"final mixture [{weights}] → {output / 'search' / 'mixture.json'}")


@mix_app.command("sample")
def mix_sample(
    output: Annotated[Path, typer.Option(help="Run directory of `mix search`.")],
    tokens: Annotated[int, typer.Option(help="Tokens to draw (the config model's tokenizer).")],
    to: Annotated[Path, typer.Option(help="The jsonl file to write.")],
    sources: Annotated[
        list[str] | None, typer.Option(help="Pool sources, as for `mix cluster`.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a training set of TOKENS tokens drawn from the pool by the searched mixture."""
    if tokens < 1:
        raise ForgetlessError("--tokens must be positive")
    cfg = _config(config, set_, {"mix.sources": sources, "data_dir": data_dir})
    from forgetless.mix import materialise_mixture

    summary = materialise_mixture(cfg, output, tokens, to)
    out.print_json(data=summary)


@app.command("config")
def show_config() -> None:
    """Print the default configuration as commented YAML."""
    # No wrapping: a wrapped comment would lose its '#' and the output would not load.
    out.print(defaults_as_yaml(), markup=False, highlight=False, soft_wrap=True)


def _print_table(table: Table) -> None:
    # A terminal folds cells to its width; piped output (docs, grep) keeps one row per line.
    (out if out.is_terminal else Console(width=250)).print(table)


@data_app.command("list")
def data_list(
    records: Annotated[
        bool, typer.Option("--records", help="Load every data set and count its records.")
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List the built-in data sets: kinds, splits, size, license and terms of use.

    Terms flag the sets whose license limits use (research only, non-commercial, share-alike).
    `--records` counts the records of every split in the native kind (a minute or two);
    `forgetless data info NAME` describes one set.
    """
    from tqdm.auto import tqdm

    from forgetless.data import DATASETS, split_sizes

    table = Table()
    columns = ["name", "kinds", "splits", "MiB", "license", "terms"]
    for column in [*columns, *(["records"] if records else [])]:
        table.add_column(column, overflow="fold")
    for spec in tqdm(DATASETS.values(), desc="counting records", disable=not records):
        row = [
            spec.name,
            ", ".join(spec.kinds),
            ", ".join(spec.splits),
            f"{spec.size_bytes / 2**20:.1f}",
            spec.licenses,
            spec.terms,
        ]
        if records:
            sizes = split_sizes(spec.name, data_dir=data_dir)
            row.append(", ".join(f"{split} {count:,}" for split, count in sizes.items()))
        table.add_row(*row)
    _print_table(table)


@data_app.command("info")
def data_info(
    name: Annotated[str, typer.Argument(help="A data set name from `forgetless data list`.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Describe one data set: sources, license, terms, kinds, and records per split."""
    from forgetless.data import get_dataset_spec, split_sizes

    spec = get_dataset_spec(name)
    sizes = split_sizes(name, data_dir=data_dir)
    lines = [
        f"{spec.name}: {spec.description}",
        f"kinds: {', '.join(spec.kinds)} (native: {spec.native_kind})",
        f"license: {spec.licenses}" + (f"; terms: {spec.terms}" if spec.terms else ""),
        f"files: {len(spec.all_files())} ({spec.size_bytes / 2**20:.1f} MiB)",
        *(f"{split}: {count:,} records" for split, count in sizes.items()),
    ]
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


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
MULTI_VALUE_OPTIONS = ("--experts", "--sources")


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


def main(argv: list[str] | None = None) -> None:
    argv = _expand_multi_value_options(sys.argv[1:] if argv is None else list(argv))
    try:
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
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


COMMAND_NAMES = _command_names()

if __name__ == "__main__":
    main()
