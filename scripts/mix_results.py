"""CLIMB mixture search, end to end, and the found mixture against simple ones.

Clusters the pool (C4 sample, PubMedQA abstracts, NWGI financial news, EUR-Lex acts), runs
the iterative search with small proxy models (objective: medical-domain and general text
loss), then continues the pre-training of the target model (SmolLM2-135M) on the same number
of tokens drawn by three mixtures: the searched one, uniform over super-clusters, and the
natural one (each super-cluster's token share). Every model is evaluated on the domain and
general tasks; changes against the base are paired. Stages are cached in the run directory,
so an interrupted run resumes. Writes ``<output>.md`` and ``<output>.json``::

    python scripts/mix_results.py --data-dir ../shared/data

The experiment is the packaged comparison ``src/forgetless/configs/mix_experiment.yaml`` (the
recipe mix -> train, one arm per mixture); this script renders its table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forgetless.config import load_raw
from forgetless.errors import ForgetlessError
from forgetless.evaluate.stats import read_evaluation
from forgetless.recipes.adapt import BASE_EVAL
from forgetless.recipes.compare import compare, expand_arms
from forgetless.report.experiment import (
    exit_with_error,
    experiment_parser,
    parse_experiment_args,
    print_event,
    shared_overrides,
    write_results,
)

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src/forgetless/configs/mix_experiment.yaml"
MIXTURES = ("climb", "uniform", "natural")


def render(summary: dict[str, Any], args) -> str:
    tasks = summary["tasks"]
    clusters = summary["clusters"]
    lines = [
        f"# CLIMB mixture search: {summary['model']}",
        "",
        f"Pool: {', '.join(summary['sources'])}; {clusters['documents']} documents, "
        f"{clusters['clusters']} k-means clusters, {clusters['kept_clusters']} kept, "
        f"{clusters['super_clusters']} super-clusters. Proxy objective: "
        f"{summary['targets']} (mean token loss, lower is better).",
        "",
        "## Search rounds",
        "",
        "Spearman on the next round: the predictor fitted on the earlier rounds, scored on "
        "this round's runs before it sees them (– when it scores them all alike). "
        "Cross-validated: 5-fold out-of-fold predictions over every run up to this round.",
        "",
        "| round | proxy runs | best objective | mean objective | Spearman on the round "
        "| Spearman cross-validated |",
        "|---|---|---|---|---|---|",
    ]

    def signed(value: float | None) -> str:
        return "–" if value is None else f"{value:+.2f}"

    for entry in summary["search"]["rounds"]:
        lines.append(
            f"| {entry['round']} | {entry['runs']} | {entry['best_objective']:.4f} | "
            f"{entry['mean_objective']:.4f} | {signed(entry.get('spearman_held_out'))} | "
            f"{signed(entry.get('spearman_cross_validated'))} |"
        )
    if summary["search"].get("noise_std") is not None:
        spreads = ", ".join(
            "–" if entry["std_objective"] is None else f"{entry['std_objective']:.4f}"
            for entry in summary["search"]["rounds"]
        )
        lines += [
            "",
            f"Proxy seed noise (natural mixture, mix.search.noise_runs seeds): objective std "
            f"{summary['search']['noise_std']:.4f}, against a spread of {spreads} within the "
            "rounds.",
        ]
    lines += [
        "",
        "## Mixtures (weight per super-cluster)",
        "",
        "| super-cluster | top terms | " + " | ".join(MIXTURES) + " |",
        "|---|---|" + "---|" * len(MIXTURES),
    ]
    for index, cluster in enumerate(summary["super_clusters"]):
        weights = " | ".join(f"{summary['weights'][m][index]:.3f}" for m in MIXTURES)
        lines.append(f"| {index} | {', '.join(cluster['top_terms'][:5])} | {weights} |")
    lines += [
        "",
        f"## Target model after {summary['tokens']:,} tokens of continued pre-training",
        "",
        "Paired change against the base (95 % interval): perplexity in % (negative = better), "
        "accuracy in points.",
        "",
        "| mixture | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        "| base | " + " | ".join(f"{summary['base'][t]:.4g}" for t in tasks) + " |",
    ]
    for name in MIXTURES:
        cells = []
        for task in tasks:
            change = summary["changes"][name][task]
            low, high = change["ci95"]
            cells.append(f"{change['change']:+.1f} [{low:+.1f}, {high:+.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python scripts/mix_results.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(__doc__, PACKAGED_CONFIG, "runs/mix_experiment", "docs/results/mix")
    parser.add_argument(
        "--tokens", type=int, default=81_920, help="Continued pre-training tokens (80 x 2 x 512)."
    )
    args = parse_experiment_args(parser, argv)
    try:
        raw = load_raw(args.config, {**shared_overrides(args), "mix.tokens": args.tokens})
        arms = expand_arms(raw, args.config)
        run = compare(arms, arms[0].config.run_dir, on_event=print_event)
    except ForgetlessError as error:
        exit_with_error(str(error))
    config = arms[0].config
    results = {arm.label: run.of(arm.label)[1] for arm in arms}
    climb = results["climb"]
    tasks = [*config.evaluate.domain_tasks, *config.evaluate.general_tasks]
    base = read_evaluation(climb[BASE_EVAL].directory)
    points = {point["arm"]: point for point in run.frontier["arms"]}
    summary = {
        "model": config.model.name,
        "sources": config.mix.sources,
        "targets": config.mix.search.targets,
        "tokens": args.tokens,
        "tasks": tasks,
        "clusters": climb["clusters"].summary,
        "super_clusters": json.loads((climb["clusters"].directory / "report.json").read_text())[
            "super_clusters"
        ],
        "search": climb["search"].summary,
        "weights": {name: results[name][f"mixture_{name}"].summary["weights"] for name in MIXTURES},
        "base": {task: base[0][task]["value"] for task in tasks},
        "changes": {name: points[name]["changes"] for name in MIXTURES},
        "training": {name: results[name]["train"].summary for name in MIXTURES},
        "frontier": str(run.directory / "frontier.html"),
    }
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
