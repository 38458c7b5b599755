"""Can a Navigator carry the signal? Issue 20's measurement of the OGS Navigator's inputs.

On a pool sample whose every record is gradient-featured (the stages of ``forgetless select
--method ogs``; packaged config ``src/forgetless/configs/navigator_signal.yaml``) this
measures:

* the reliability ceiling: the exact per-sample scores (utility, each cost, and the
  Lagrangian u - lam * c at the exact constrained multiplier) under two warm-up/projection
  seeds, and their test-retest Spearman. No predictor of the score can be expected to rank
  beyond the agreement of the score with itself;
* the Navigator's k-fold cross-validated Spearman against the first seed's exact score, and
  a ridge regression's on the same inputs, for each set of inputs: the gradient-free ones
  (embedding, length, loss), the forward-only output-layer gradient sketch's geometry
  (``head_gradient``), and all of them;
* how each sketch-geometry input ranks like its exact counterpart (Spearman);
* with ``--partial-blocks K ...`` (default 1 and 4): the scores computed from the part of the
  first seed's gradient features that the last K blocks contribute (a forward pass and the
  backward of K blocks), against the exact ones, with their cost in seconds.

Writes ``<output>.md`` and ``<output>.json``. Every stage is cached in the run directory::

    python scripts/navigator_signal.py --data-dir ../shared/data
    python scripts/navigator_signal.py --quick    # tiny-llama, a few records: every step
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.config import load_raw, validate_config
from forgetless.errors import ForgetlessError
from forgetless.evaluate.stats import format_correlation, rank_correlation
from forgetless.report.experiment import (
    add_quick_flag,
    default_paths,
    exit_with_error,
    experiment_overrides,
    experiment_parser,
    parse_experiment_args,
    print_event,
    write_results,
)
from forgetless.runs import run_directory
from forgetless.select.inputs import HEAD_COLUMNS
from forgetless.select.metrics import COSTS, ExactChoice, exact_choice
from forgetless.select.navigator import cross_validate

PACKAGED_CONFIG = (
    Path(__file__).resolve().parents[1] / "src/forgetless/configs/navigator_signal.yaml"
)
QUICK_SETTINGS = {
    "model.name": "tiny-llama",
    "data.source": "financial_pool",
    "data.limit": 40,
    "select.featured_samples": 40,
    "select.anchor.samples": 8,
    "select.validation.source": "financial_pool",
    "select.validation.samples": 6,
    "select.gradient.projection_dim": 16,
    "select.gradient.warmup_steps": 1,
    "select.gradient.max_length": 128,
    "select.navigator.iterations": 10,
    "select.navigator.candidates": 12,
    "select.navigator.inputs.head_sketch_rows": 8,
    "select.navigator.inputs.head_sketch_columns": 4,
}
INPUT_SETS = {
    "gradient-free (embedding, length, loss)": lambda column: column not in HEAD_COLUMNS,
    "head-gradient sketch geometry": lambda column: column in HEAD_COLUMNS,
    "all": lambda column: True,
}
# Each sketch input and the exact score it estimates.
COUNTERPARTS = {
    "head_utility": "utility",
    "head_energy": "energy",
    "head_alignment": "alignment",
}


def parse_args(argv: list[str] | None):
    parser = experiment_parser(__doc__, PACKAGED_CONFIG, None, None)
    parser.add_argument(
        "--seeds", type=int, nargs=2, default=[0, 1], help="The two warm-up/projection seeds."
    )
    parser.add_argument(
        "--partial-blocks",
        type=int,
        nargs="*",
        default=[1, 4],
        help="Also score from the gradients of the last K blocks only, for each K given.",
    )
    parser.add_argument(
        "--learning-curve",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75],
        help="Also cross-validate the Navigator trained on these shares of each fold's "
        "training samples (the same held-out folds).",
    )
    add_quick_flag(parser)
    args = parse_experiment_args(parser, argv)
    default_paths(args, "navigator_signal")
    if args.seeds[0] == args.seeds[1]:
        exit_with_error("--seeds must be two different seeds")
    if any(blocks < 1 for blocks in args.partial_blocks):
        exit_with_error("--partial-blocks must be positive block counts")
    if any(not 0 < share < 1 for share in args.learning_curve):
        exit_with_error("--learning-curve shares must lie strictly between 0 and 1")
    return args


def exact_scores(
    select, results, suffix: str = "", columns: slice = slice(None)
) -> tuple[dict[str, np.ndarray], np.ndarray, ExactChoice]:
    """Every exact per-sample score of one seed's gradients (of the gradient stages named
    with ``suffix``; from the feature ``columns`` only, if given), which samples have one, and
    the exact constrained choice."""
    from forgetless.select.stages import pool_scores

    roles = ("anchor", "validation", "pool")
    features = {f"gradients_{role}": results[f"gradients_{role}{suffix}"] for role in roles}
    scores, valid, _ = pool_scores(select, features, "gradients_pool", columns)
    exact = {"utility": scores.utility, "alignment": scores.alignment}
    for kind in COSTS:
        exact[kind] = scores.cost(kind)
    cost = scores.cost(select.cost)
    choice = exact_choice(
        scores.utility[valid],
        cost[valid],
        select.budget,
        select.cost_limit,
        select.cost_limit_basis,
    )
    exact["lagrangian"] = scores.utility - choice.multiplier * cost
    return exact, valid, choice


def measure(args) -> dict[str, Any]:
    from forgetless.select.stages import (
        PartialGradientStage,
        Selection,
        gradient_stages,
        selection_stages,
    )

    overrides = experiment_overrides(args, QUICK_SETTINGS)
    raw = load_raw(args.config, overrides)
    config = validate_config(raw, args.config)
    if config.select.method != "ogs" or config.select.featured_samples < (config.data.limit or 0):
        raise ForgetlessError(
            "the measurement needs select.method=ogs with every record featured "
            "(select.featured_samples >= data.limit)"
        )
    if config.select.gradient.projector == "exact":
        raise ForgetlessError(
            "the measurement compares sketched features across seeds and their parts: "
            "select.gradient.projector=exact has neither"
        )
    run_dir = Path(config.run_dir)
    per_seed, choices, seed_results, valid = {}, {}, {}, None
    for position, seed in enumerate(args.seeds):
        select = config.select.model_copy(update={"seed": seed})
        selection = Selection(config.model, config.data, select, data_dir=config.data_dir)
        # The first seed runs the whole ogs selection (its Navigator inputs included); the
        # second only what its exact scores need.
        stages = selection_stages(selection) if position == 0 else gradient_stages(selection)
        if position == 0:
            stages += [
                PartialGradientStage(selection, role, blocks)
                for blocks in args.partial_blocks
                for role in ("anchor", "validation", "pool")
            ]
        runs = run_directory(run_dir / f"seed_{seed}", config, print_event)
        # The gradients are read here, not only by the stages after them.
        results = runs.run_all(stages, keep=[stage.name for stage in stages])
        if position == 0:
            first_results = results
        seed_results[seed] = (select, results)
        per_seed[seed], seed_valid, choices[seed] = exact_scores(select, results)
        valid = seed_valid if valid is None else valid & seed_valid
    first, second = (per_seed[seed] for seed in args.seeds)
    reliability = {
        name: rank_correlation(first[name][valid], second[name][valid]) for name in first
    }
    # A Spearman is undefined where a score is constant (a clipped cost zero for every
    # record); the range says which.
    ranges = {
        name: [float(first[name][valid].min()), float(first[name][valid].max())] for name in first
    }
    inputs = np.load(first_results["navigator_inputs"].directory / "inputs.npy")[valid]
    columns = _columns(first_results)
    select = config.select.model_copy(update={"seed": args.seeds[0]})
    cost = first[select.cost][valid]
    utility = first["utility"][valid]
    limit = choices[args.seeds[0]].limit
    folds = max(2, select.navigator.folds)
    navigator, curve = {}, {}
    for label, wanted in INPUT_SETS.items():
        chosen = [index for index, column in enumerate(columns) if wanted(column)]
        if not chosen:
            continue
        for share in (1.0, *args.learning_curve):
            result, _, _ = cross_validate(
                inputs[:, chosen],
                utility,
                cost,
                first["lagrangian"][valid],
                select.navigator,
                budget=select.budget,
                cost_limit=limit,
                folds=folds,
                seed=select.seed,
                progress=False,
                train_share=share,
            )
            if share == 1.0:
                navigator[label] = {**result, "columns": len(chosen)}
            else:
                curve.setdefault(label, []).append({"share": share, **result})
    # How much of the exact score each part explains (the Lagrangian against its terms).
    parts = {
        name: rank_correlation(first["lagrangian"][valid], first[name][valid])
        for name in ("utility", select.cost)
    }
    sketch = {
        column: rank_correlation(inputs[:, columns.index(column)], first[target][valid])
        for column, target in COUNTERPARTS.items()
        if column in columns
    }
    return {
        "projection_noise": _projection_noise(seed_results, valid, args.seeds),
        "learning_curve": curve,
        "partial_gradients": _partial_agreement(select, first, valid, first_results, args),
        "model": config.model.name,
        "pool": config.data.source,
        "samples": int(valid.sum()),
        "seeds": args.seeds,
        "cost": select.cost,
        "budget": select.budget,
        "gradient": select.gradient.model_dump(mode="json"),
        "reliability": reliability,
        "ranges": ranges,
        "exact_choice": {str(seed): dataclasses.asdict(choice) for seed, choice in choices.items()},
        "navigator": navigator,
        "sketch_vs_exact": sketch,
        "lagrangian_vs_parts": parts,
        "stage_seconds": {
            name: result.summary.get("seconds")
            for name, result in first_results.items()
            if isinstance(result.summary, dict)
        },
    }


def _projection_noise(seed_results, valid, seeds) -> dict[str, Any]:
    """Scores from the two halves of the projection's columns: two independent projections of
    the same gradients. Their agreement within a seed is what the projection alone leaves;
    across seeds at the same width, what the warm-up adds."""
    from forgetless.select.gradients import load_gradient_features

    select, results = seed_results[seeds[0]]
    width = load_gradient_features(results["gradients_pool"].directory).vectors.shape[1]
    halves = (slice(0, width // 2), slice(width // 2, width))
    names = ("utility", select.cost, "lagrangian")
    scores = {
        seed: [exact_scores(*seed_results[seed], columns=half)[0] for half in halves]
        for seed in seeds
    }

    def agreement(first, second):
        return {name: rank_correlation(first[name][valid], second[name][valid]) for name in names}

    return {
        "columns": width // 2,
        "same_warmup": {str(seed): agreement(*scores[seed]) for seed in seeds},
        "across_seeds": agreement(scores[seeds[0]][0], scores[seeds[1]][0]),
    }


def _partial_agreement(select, exact, valid, results, args) -> dict[str, Any]:
    """Spearman of each score from the last K blocks' gradients with the exact one."""
    agreement = {}
    for blocks in args.partial_blocks:
        partial, partial_valid, _ = exact_scores(select, results, f"_last{blocks}")
        both = valid & partial_valid
        agreement[f"last {blocks}"] = {
            "spearman": {
                name: rank_correlation(partial[name][both], exact[name][both])
                for name in ("utility", select.cost, "lagrangian")
            },
            "pool_seconds": results[f"gradients_pool_last{blocks}"].summary["seconds"],
            "exact_pool_seconds": results["gradients_pool"].summary["seconds"],
        }
    return agreement


def _columns(results) -> list[str]:
    import json

    return json.loads((results["navigator_inputs"].directory / "columns.json").read_text())


def _choice_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for seed, choice in summary["exact_choice"].items():
        met = "met"
        if not choice["limit_met"]:
            met = (
                "cannot be met: even the least costly selection exceeds it, so the Lagrangian "
                "ranks by the cost alone"
            )
        lines.append(
            f"Seed {seed}: multiplier {choice['multiplier']:.4g}, cost limit "
            f"{choice['limit']:.4g} {met}."
        )
    return [" ".join(lines), ""]


def render(summary: dict[str, Any], args) -> str:
    reliability = summary["reliability"]
    lines = [
        f"# Can a Navigator carry the signal? ({summary['model']}, {summary['samples']} "
        f"{summary['pool']} records)",
        "",
        f"Exact scores from {summary['gradient']['parameters']} gradients "
        f"(d = {summary['gradient']['projection_dim']}, ≤ {summary['gradient']['max_length']} "
        f"tokens); the Lagrangian uses cost `{summary['cost']}` at budget "
        f"{summary['budget']:.0%}.",
        "",
        *_choice_lines(summary),
        "## Reliability ceiling: the exact score against itself",
        "",
        f"Spearman between warm-up/projection seeds {summary['seeds'][0]} and "
        f"{summary['seeds'][1]}, same records:",
        "",
        "| score | test-retest Spearman | range (first seed) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {format_correlation(value)} | {summary['ranges'][name][0]:+.3f} to "
        f"{summary['ranges'][name][1]:+.3f} |"
        for name, value in reliability.items()
    ]
    lines += [
        "",
        "## The Navigator against the exact score (cross-validated)",
        "",
        "| inputs | columns | Navigator Spearman | ridge Spearman | Navigator top: utility / "
        "cost | exact top: utility / cost |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in summary["navigator"].items():
        top, exact = entry["navigator_top"], entry["exact_top"]
        lines.append(
            f"| {label} | {entry['columns']} | {format_correlation(entry['spearman_vs_exact'])} | "
            f"{format_correlation(entry['ridge_spearman_vs_exact'])} | {top['utility']:.3f} / "
            f"{top['cost']:.3f} | {exact['utility']:.3f} / {exact['cost']:.3f} |"
        )
    parts = summary["lagrangian_vs_parts"]
    lines += [
        "",
        "The exact score against its terms (Spearman): "
        + ", ".join(f"{name} {format_correlation(value)}" for name, value in parts.items())
        + ".",
    ]
    noise = summary["projection_noise"]
    names = ("utility", summary["cost"], "lagrangian")
    lines += [
        "",
        "## Where the test-retest noise comes from",
        "",
        f"Scores from half the projection's columns ({noise['columns']} each): the two halves "
        "are independent projections of the same gradients.",
        "",
        "| compared | " + " | ".join(names) + " |",
        "|---|---|---|---|",
    ]
    for seed, rho in noise["same_warmup"].items():
        lines.append(
            f"| seed {seed}, one half vs the other (same warm-up) | "
            + " | ".join(format_correlation(rho[name]) for name in names)
            + " |"
        )
    lines.append(
        f"| seed {summary['seeds'][0]} vs seed {summary['seeds'][1]}, first halves (warm-up "
        "and projection differ) | "
        + " | ".join(format_correlation(noise["across_seeds"][name]) for name in names)
        + " |"
    )
    if summary["learning_curve"]:
        lines += [
            "",
            "## Learning curve: fewer training samples, the same held-out folds",
            "",
            "| inputs | training samples per fold | Navigator Spearman | ridge Spearman |",
            "|---|---|---|---|",
        ]
        for label, points in summary["learning_curve"].items():
            for point in [*points, summary["navigator"][label]]:
                lines.append(
                    f"| {label} | {point['training_samples']:.0f} | "
                    f"{format_correlation(point['spearman_vs_exact'])} | "
                    f"{format_correlation(point['ridge_spearman_vs_exact'])} |"
                )
    if summary["sketch_vs_exact"]:
        lines += [
            "",
            "## Each sketch input against its exact counterpart",
            "",
            "| sketch input | exact score | Spearman |",
            "|---|---|---|",
        ]
        lines += [
            f"| {column} | {COUNTERPARTS[column]} | {format_correlation(value)} |"
            for column, value in summary["sketch_vs_exact"].items()
        ]
    if summary["partial_gradients"]:
        lines += [
            "",
            "## Scores from the gradients of the last blocks only",
            "",
            "The part of seed "
            f"{summary['seeds'][0]}'s features that the last K blocks contribute (same warm-up "
            "and projection), from a forward pass and the backward of those blocks; Spearman "
            "with the exact score, and the pool pass's time against the exact one's:",
            "",
            f"| blocks | utility | {summary['cost']} | Lagrangian | time vs exact |",
            "|---|---|---|---|---|",
        ]
        for label, entry in summary["partial_gradients"].items():
            rho = entry["spearman"]
            ratio = entry["pool_seconds"] / entry["exact_pool_seconds"]
            lines.append(
                f"| {label} | "
                + " | ".join(
                    format_correlation(rho[name])
                    for name in ("utility", summary["cost"], "lagrangian")
                )
                + f" | {ratio:.2f}x |"
            )
    lines += ["", f"Command: `python scripts/navigator_signal.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = measure(args)
    except ForgetlessError as error:
        exit_with_error(str(error))
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
