"""lm-evaluation-harness both ways, the default config, and the built-in data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from forgetless.cli.app import app, cli_command, data_app, lm_eval_app
from forgetless.cli.options import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    SetOpt,
    cli_config,
    config_option,
    split_tasks,
)
from forgetless.cli.output import (
    emit,
    err,
    out,
    print_table,
)
from forgetless.config import (
    defaults_as_yaml,
)


@cli_command(lm_eval_app, "export")
def lm_eval_export(
    tasks: Annotated[
        str, typer.Option(help="Comma-separated forgetless tasks, as for `forgetless eval`.")
    ],
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Folder for the task configs and items.")
    ],
    limit: Annotated[
        int | None, config_option("evaluate.limit", "Export the first N items per task.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write our tasks as lm-eval task configs reading the very items forgetless scores.

    One jsonl and one YAML per task plus the group `forgetless_retention`; lm-eval then runs
    them with `--include_path OUTPUT_DIR` (docs/lm_eval.md)."""
    cfg = cli_config(config, set_, {"evaluate.limit": limit, "data_dir": data_dir})
    from forgetless.evaluate.lm_eval import export_tasks

    written = export_tasks(split_tasks(tasks) or [], cfg.evaluate, output_dir, cfg.data_dir)
    paths = [str(path) for path in written]
    emit(paths, lambda: out().print("\n".join(paths), markup=False, highlight=False), json_)
    err.print(
        f"run them: forgetless lm-eval run --model M --include-path {output_dir} "
        "--tasks forgetless_retention"
    )


@cli_command(lm_eval_app, "run")
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

    task_names = split_tasks(tasks) or []
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
        out().print(table)

    emit(result, show, json_)


@cli_command(app, "config")
def show_config() -> None:
    """Print the default configuration as commented YAML."""
    # No wrapping: a wrapped comment would lose its '#' and the output would not load.
    out().print(defaults_as_yaml(), markup=False, highlight=False, soft_wrap=True)


@cli_command(data_app, "list")
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
        print_table(table)

    emit(rows, show, json_)


@cli_command(data_app, "info")
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
    emit(info, lambda: out().print(text, markup=False, highlight=False, soft_wrap=True), json_)
