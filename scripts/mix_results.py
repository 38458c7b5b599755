r"""CLIMB mixture search, end to end, and the found mixture against simple ones.

Clusters the pool (C4 sample, PubMedQA abstracts, NWGI financial news, EUR-Lex acts), runs
the iterative search with small proxy models (objective: medical-domain and general text
loss), then continues the pre-training of the target model (SmolLM2-135M) on the same number
of tokens drawn by three mixtures: the searched one, uniform over super-clusters, and the
natural one (each super-cluster's token share). Every model is evaluated on the domain and
general tasks; changes against the base are paired. Stages are cached in the run directory,
so an interrupted run resumes. Writes ``<output>.md`` and ``<output>.json``::

    python scripts/mix_results.py --data-dir ../shared/data

The experiment is the packaged comparison ``src/forgetless/configs/mix_experiment.yaml`` (the
recipe mix -> train, one arm per mixture); this script renders its table. Another comparison
config works alike, e.g. the retention-aware search against natural, uniform and domain-only
training (``mix_retention.yaml``; results in ``docs/results/<config name>`` by default), with
every arm trained under several seeds::

    python scripts/mix_results.py --data-dir ../shared/data \
        --config src/forgetless/configs/mix_retention.yaml --train-seeds 0 1 2

Each arm's change against the base is pooled over its training seeds, and the searched
mixture's difference from every other arm comes with an interval that resamples the items
(paired) and the seeds (``forgetless.evaluate.seeded``). It is Pareto-better than another arm
when it is worse on no task beyond that interval and better on at least one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.config import load_raw
from forgetless.errors import ForgetlessError
from forgetless.evaluate.seeded import arm_cells, contrast_cells, pooled_changes
from forgetless.evaluate.stats import read_evaluation
from forgetless.recipes.adapt import ADAPTED_EVAL, BASE_EVAL
from forgetless.recipes.compare import compare, expand_arms, plan_comparison
from forgetless.report.experiment import (
    add_dry_run_flag,
    default_paths,
    exit_with_error,
    experiment_parser,
    parse_experiment_args,
    print_event,
    print_plan_counts,
    shared_overrides,
    write_results,
)

PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "src/forgetless/configs/mix_experiment.yaml"
SEARCHED = "climb"  # the arm whose mixture the search found; every contrast is against it


def axis_verdict(contrast: dict, higher_is_better: bool) -> str:
    """better / worse / within noise: the searched arm against another on one task, from the
    interval of their difference (losses in nats: below zero is better)."""
    low, high = contrast["ci95"]
    if higher_is_better:
        low, high = -high, -low
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "within noise"


def pareto_verdicts(pooled: dict, higher_is_better: dict[str, bool]) -> dict[str, Any]:
    """For each arm the searched one is contrasted with: the verdict per task, and whether it
    is Pareto-better (worse on none beyond the interval, better on at least one)."""
    others = [second for first, second in pooled["contrasts"]]
    verdicts = {}
    for other in others:
        tasks = {
            task: axis_verdict(result["contrasts"][f"{SEARCHED}-{other}"], higher_is_better[task])
            for task, result in pooled["tasks"].items()
        }
        values = set(tasks.values())
        verdicts[other] = {
            "tasks": tasks,
            "pareto_better": "worse" not in values and "better" in values,
        }
    return verdicts


def render(summary: dict[str, Any], args) -> str:
    tasks = summary["tasks"]
    clusters = summary["clusters"]
    mixtures = list(summary["weights"])
    constraints = summary["constraints"]
    lines = [
        f"# CLIMB mixture search: {summary['model']}",
        "",
        f"Pool: {', '.join(summary['sources'])}; {clusters['documents']} documents, "
        f"{clusters['clusters']} k-means clusters, {clusters['kept_clusters']} kept, "
        f"{clusters['super_clusters']} super-clusters. Proxy objective: "
        f"{summary['targets']} (mean token loss, lower is better)"
        + (
            f"; constraints (largest relative perplexity increase against the natural "
            f"mixture's proxy): {constraints}."
            if constraints
            else "."
        ),
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
    verification = summary.get("verification")
    if verification:
        lines += [
            "",
            "Verification (mix.search.verify_runs fresh proxy seeds; mean ± sd): "
            + "; ".join(
                f"{name.replace('_', ' ')}: objective {row['objective']:.4f} ± "
                f"{row['objective_std'] or 0:.4f}"
                + "".join(
                    f", {task} ppl {math.exp(loss):.3f}" for task, loss in row["losses"].items()
                )
                + ("" if row["keeps_constraints"] else " (breaks a constraint)")
                for name, row in verification["candidates"].items()
            )
            + f". Trained: {verification['chosen'].replace('_', ' ')}.",
        ]
    lines += [
        "",
        "## Mixtures (weight per super-cluster)",
        "",
        "| super-cluster | top terms | " + " | ".join(mixtures) + " |",
        "|---|---|" + "---|" * len(mixtures),
    ]
    for index, cluster in enumerate(summary["super_clusters"]):
        weights = " | ".join(f"{summary['weights'][m][index]:.3f}" for m in mixtures)
        lines.append(f"| {index} | {', '.join(cluster['top_terms'][:5])} | {weights} |")
    seeds = summary["train_seeds"]
    lines += [
        "",
        f"## Target model after {summary['tokens']:,} tokens of continued pre-training",
        "",
        "Paired change against the base (95 % interval): perplexity in % (negative = better), "
        "accuracy in points"
        + (
            f"; mean ± sd over the training seeds {seeds}, the interval resampling the items "
            "and the seeds."
            if len(seeds) > 1
            else "."
        ),
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
        "| base | " + " | ".join(f"{summary['base'][t]:.4g}" for t in tasks) + " |",
    ]
    pooled = summary["pooled"]
    for name in summary["arms"]:
        lines.append(f"| {name} | " + " | ".join(arm_cells(pooled, name, tasks)) + " |")
    if pooled["contrasts"]:
        lines += [
            "",
            "## The searched mixture against each other arm",
            "",
            f"Difference {SEARCHED} − arm (perplexity as the ratio of the two, in %; accuracy "
            "in points) [95 % interval]; Pareto-better: worse on no task beyond the interval, "
            "better on at least one.",
            "",
            "| arm | " + " | ".join(tasks) + " | Pareto-better |",
            "|---" * (len(tasks) + 2) + "|",
        ]
        for first, second in pooled["contrasts"]:
            verdict = summary["verdicts"][second]
            cells = [
                f"{cell} ({verdict['tasks'][task]})"
                for cell, task in zip(
                    contrast_cells(pooled, first, second, tasks), tasks, strict=True
                )
            ]
            better = "yes" if verdict["pareto_better"] else "no"
            lines.append(f"| {second} | " + " | ".join(cells) + f" | {better} |")
    for task, rows in summary.get("by_source", {}).items():
        sources = list(rows["documents"])
        lines += [
            "",
            f"## {task} by source",
            "",
            "Perplexity change against the base on each source's documents, in % (mean over "
            "the training seeds).",
            "",
            "| arm | " + " | ".join(f"{s} ({rows['documents'][s]})" for s in sources) + " |",
            "|---" * (len(sources) + 1) + "|",
        ]
        for name, cells in rows["arms"].items():
            lines.append(f"| {name} | " + " | ".join(f"{cells[s]:+.1f}" for s in sources) + " |")
    lines += ["", f"Command: `python scripts/mix_results.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def summarise(config, args, arms, run) -> dict[str, Any]:
    results = {arm.label: run.of(arm.label)[1] for arm in arms}
    # Each frontier point's models: one, or one per seed of compare.seeds.
    labels = {
        point["label"]: point.get("models", [point["label"]]) for point in run.frontier["arms"]
    }
    searched = results[labels[SEARCHED][0]]
    tasks = [*config.evaluate.domain_tasks, *config.evaluate.general_tasks]
    base = read_evaluation(searched[BASE_EVAL].directory)
    evaluations = {
        label: read_evaluation(res[ADAPTED_EVAL].directory) for label, res in results.items()
    }
    methods = {name: mixture_method(arms, group[0]) for name, group in labels.items()}
    mixtures = {
        name: results[labels[name][0]][f"mixture_{method}"].summary["weights"]
        for name, method in methods.items()
        if method is not None
    }
    contrasts = [(SEARCHED, name) for name in labels if name != SEARCHED]
    pooled = pooled_changes(tasks, base, evaluations, labels, contrasts)
    # Each model's own changes: the frontier's points, or its models when it pools seeds.
    models = {model["label"]: model for model in run.frontier.get("models", run.frontier["arms"])}
    return {
        "model": config.model.name,
        "sources": config.mix.sources,
        "targets": config.mix.search.targets,
        "constraints": config.mix.search.constraints,
        "tokens": args.tokens,
        "train_seeds": config.compare.seeds or [config.train.seed],
        "tasks": tasks,
        "arms": labels,
        "clusters": searched["clusters"].summary,
        "super_clusters": json.loads((searched["clusters"].directory / "report.json").read_text())[
            "super_clusters"
        ],
        "search": searched["search"].summary,
        "verification": verification_of(searched["search"]),
        "weights": mixtures,
        "base": {task: base[0][task]["value"] for task in tasks},
        "changes": {label: models[label]["changes"] for label in results},
        "pooled": pooled,
        "verdicts": pareto_verdicts(
            pooled, {task: base[0][task]["higher_is_better"] for task in tasks}
        ),
        "by_source": changes_by_source(config, tasks, base, evaluations, labels),
        "training": {label: res["train"].summary for label, res in results.items()},
        "frontier": str(run.directory / "frontier.html"),
    }


def verification_of(search) -> dict[str, Any] | None:
    """The final candidates' verification runs, from the search's own record (None when the
    search ran without them)."""
    record = search.directory / "search.json"
    final = json.loads(record.read_text())["final"] if record.is_file() else {}
    if "verification" not in final:
        return None
    return {"chosen": final["chosen"], "candidates": final["verification"]}


def changes_by_source(config, tasks, base, evaluations, labels) -> dict[str, Any]:
    """Each arm's perplexity change (%, mean over its seeds) on the documents of each source
    of a pool's perplexity task: where a mixture's gain or loss comes from."""
    from forgetless.data.pools import pool_member
    from forgetless.evaluate.tasks import load_task_records, parse_task

    breakdown = {}
    for task in tasks:
        if base[0][task]["metric"] != "perplexity":
            continue
        records = load_task_records(parse_task(task), config.evaluate, data_dir=config.data_dir)
        members = [pool_member(str(getattr(record, "id", ""))) for record in records]
        if None in members:
            continue
        sources = np.array(members)
        if len(set(sources)) < 2:
            continue
        before = base[1][task]
        tokens = np.array(before["document_tokens"])
        rows: dict[str, Any] = {"documents": {}, "arms": {}}
        for source in sorted(set(sources)):
            rows["documents"][source] = int((sources == source).sum())
        for name, models in labels.items():
            rows["arms"][name] = {}
            for source in rows["documents"]:
                mask = sources == source
                changes = [
                    math.expm1(
                        (
                            np.array(evaluations[model][1][task]["document_nll"])[mask].sum()
                            - np.array(before["document_nll"])[mask].sum()
                        )
                        / tokens[mask].sum()
                    )
                    for model in models
                ]
                rows["arms"][name][source] = 100 * float(np.mean(changes))
        breakdown[task] = rows
    return breakdown


def mixture_method(arms, label: str) -> str | None:
    """The mixture an arm trains on, or None for an arm without the mix step."""
    arm = next(arm for arm in arms if arm.label == label)
    return arm.config.mix.method if "mix" in arm.config.recipe.steps else None


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(__doc__, PACKAGED_CONFIG, None, None)
    parser.add_argument(
        "--tokens", type=int, default=81_920, help="Continued pre-training tokens (80 x 2 x 512)."
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        help="Train every arm once per seed (compare.seeds; default: the config's).",
    )
    add_dry_run_flag(parser)
    args = parse_experiment_args(parser, argv)
    if args.config.resolve() == PACKAGED_CONFIG:
        args.run_dir = args.run_dir or "runs/mix_experiment"
        args.output = args.output or "docs/results/mix"
    else:
        default_paths(args, args.config.stem)
    overrides = {**shared_overrides(args), "mix.tokens": args.tokens}
    if args.train_seeds:
        overrides["compare.seeds"] = args.train_seeds
    try:
        raw = load_raw(args.config, overrides)
        if SEARCHED not in ((raw.get("compare") or {}).get("arms") or {}):
            raise ForgetlessError(f"compare.arms must include {SEARCHED!r}, the searched mixture")
        arms = expand_arms(raw, args.config)
        if args.dry_run:
            print_plan_counts("mix", plan_comparison(arms, arms[0].config.run_dir))
            return
        run = compare(arms, arms[0].config.run_dir, on_event=print_event)
    except ForgetlessError as error:
        exit_with_error(str(error))
    summary = summarise(arms[0].config, args, arms, run)
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
