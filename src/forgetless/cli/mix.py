"""``forgetless mix``: cluster a pool, search mixture weights, sample a training set (CLIMB)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from forgetless.cli.app import cli_command, mix_app
from forgetless.cli.options import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    SetOpt,
    cli_config,
    config_option,
)
from forgetless.cli.output import (
    emit,
    err,
    out,
    print_fields,
    print_markdown,
    read_json,
    stage_event,
)
from forgetless.errors import ForgetlessError

MixDirOpt = Annotated[
    Path,
    typer.Option(
        "--output-dir", "-o", help="Run directory of the mix stages (cluster, search, sample)."
    ),
]
SourcesOpt = Annotated[
    list[str] | None,
    config_option("mix.sources", "Pool sources: --sources c4 pubmedqa@train ... (names or files)."),
]


@cli_command(mix_app, "cluster")
def mix_cluster(
    output_dir: MixDirOpt,
    sources: SourcesOpt = None,
    clusters: Annotated[
        int | None, config_option("mix.cluster.clusters", "k of the k-means.")
    ] = None,
    limit_per_source: Annotated[
        int | None, config_option("mix.limit_per_source", "Use at most N documents per source.")
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
    cfg = cli_config(
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

    results = run_clustering(cfg, output_dir, on_event=stage_event)
    directory = results["clusters"].directory
    emit(
        read_json(directory / "report.json"),
        lambda: print_markdown(directory / "report.md"),
        json_,
    )


@cli_command(mix_app, "search")
def mix_search(
    output_dir: MixDirOpt,
    sources: SourcesOpt = None,
    rounds: Annotated[
        str | None,
        config_option(
            "mix.search.rounds", "Proxy runs per round, comma-separated (e.g. 64,32,16)."
        ),
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
    cfg = cli_config(
        config,
        set_,
        {"mix.sources": sources, "mix.search.rounds": round_counts, "data_dir": data_dir},
    )
    from forgetless.mix import run_mixture_search

    outcome = run_mixture_search(cfg, output_dir, propose_only=propose_only, on_event=stage_event)
    if outcome["status"] == "waiting":
        emit(outcome, lambda: None, json_)
        err.print(
            f"{outcome['step']}: {len(outcome['pending'])} mixtures await proxy "
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
        out().print(table)

    emit(outcome, show, json_)
    final = outcome["final"]
    for name, row in final.get("verification", {}).items():
        kept = "" if row["keeps_constraints"] else ", breaks a constraint"
        err.print(
            f"verified {name.replace('_', ' ')}: objective {row['objective']:.4f} over "
            f"{row['runs']} proxy seeds{kept}" + (" (chosen)" if name == final["chosen"] else "")
        )
    weights = ", ".join(f"{w:.3f}" for w in final["weights"])
    err.print(f"final mixture [{weights}] → {output_dir / 'search' / 'mixture.json'}")


@cli_command(mix_app, "sample")
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
    cfg = cli_config(config, set_, {"mix.sources": sources, "data_dir": data_dir})
    from forgetless.mix import materialise_mixture

    summary = materialise_mixture(cfg, output_dir, tokens, output)
    emit(summary, lambda: print_fields(summary), json_)
