"""The method commands: the registry's listing, merge and select."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from forgetless import registry
from forgetless.cli.app import app, cli_command
from forgetless.cli.options import (
    ConfigOpt,
    DataDirOpt,
    DataRevisionOpt,
    JsonOpt,
    ModelOpt,
    PrivateOpt,
    PushOpt,
    RevisionOpt,
    SetOpt,
    check_push,
    cli_config,
    config_option,
)
from forgetless.cli.output import (
    emit,
    err,
    out,
    print_table,
    stage_event,
)
from forgetless.errors import ForgetlessError


@cli_command(app, "methods")
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
            out().print("\n\n".join(blocks), markup=False, highlight=False, soft_wrap=True)
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
        print_table(table)

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
    emit(rows, show, json_)


@cli_command(app)
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
    method: Annotated[str | None, config_option("merge.method", "Merge method.")] = None,
    keep: Annotated[
        float | None, config_option("merge.keep", "Fraction of each delta kept (sotu, dare, ties).")
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
        float | None, config_option("merge.scale", "Multiplier of the merged delta.")
    ] = None,
    masks: Annotated[
        str | None,
        config_option("merge.masks", "Random masks drawn per expert, or a disjoint partition."),
    ] = None,
    weights: Annotated[
        list[float] | None,
        config_option("merge.weights", "One weight per expert: --weights W1 W2 ..."),
    ] = None,
    densities: Annotated[
        list[float] | None,
        config_option("merge.densities", "One keep per expert: --densities D1 D2 ..."),
    ] = None,
    normalize: Annotated[
        bool | None,
        typer.Option(
            "--normalize/--no-normalize",
            help="Divide the merged delta by the sum of the weights (the experts' average).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int | None, config_option("merge.seed", "Seed of the random masks.")] = None,
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
    cfg = cli_config(
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
    check_push(push_to_hub, private)
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
        out().print(table)

    emit(report.to_dict(), show, json_)
    expected = report.expected_collision_rate
    err.print(
        f"collision rate {overlap['collision_rate']:.4f}"
        + (f" (independent masks: {expected:.4f})" if expected is not None else "")
        + f"; report: {output_dir / 'merge_report.json'}"
    )
    if report.hub_url:
        err.print(f"pushed → {report.hub_url}", markup=False)


@cli_command(app)
def select(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Run directory (stages are cached there).")
    ],
    method: Annotated[str | None, config_option("select.method", "Selection method.")] = None,
    budget: Annotated[
        float | None, config_option("select.budget", "Fraction of the pool to select.")
    ] = None,
    budget_tokens: Annotated[
        int | None,
        config_option("select.budget_tokens", "Select up to this many training tokens instead."),
    ] = None,
    data: Annotated[
        str | None, config_option("data.source", "Pool: data set name, file, or hub data set id.")
    ] = None,
    kind: Annotated[
        str | None, config_option("data.kind", "How to read the pool's records.")
    ] = None,
    split: Annotated[str | None, config_option("data.split", "Split of the pool data set.")] = None,
    limit: Annotated[
        int | None, config_option("data.limit", "Use the first N pool records.")
    ] = None,
    data_revision: DataRevisionOpt = None,
    anchor: Annotated[
        str | None, config_option("select.anchor.source", "General-knowledge anchor data.")
    ] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    seed: Annotated[
        int | None, config_option("select.seed", "Seed of every random choice.")
    ] = None,
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
    cfg = cli_config(
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

    results = run_selection(cfg, output_dir, on_event=stage_event)
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
            out().print(table)

    emit(summary, show, json_)
    err.print(f"selected records: {selection.directory / 'selected.jsonl'}")
