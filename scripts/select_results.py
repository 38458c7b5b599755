"""Training data selection: domain gain vs general retention at an equal step budget.

For each domain (medical: PubMedQA abstracts; financial: NWGI news sentences, scored on the
Financial PhraseBank) this selects ``budget`` (10 %) of the pool with random, LESS,
orthogonal and OGS selection (``forgetless select``; the methods share one run directory, so
the gradients are computed once), fine-tunes SmolLM2-135M-Instruct in full on each selection
and on the whole pool with the same number of steps, and evaluates every model on the
domain's held-out perplexity and on the general tasks (C4 and GSM8K perplexity, ARC-easy,
PIQA). Changes against the base are paired. Every stage is cached in the run directory, so
an interrupted run resumes. Writes ``<output>.md`` and ``<output>.json``::

    python scripts/select_results.py --data-dir ../shared/data
    python scripts/select_results.py --domains medical --methods random ogs

The experiment is the packaged comparison ``src/forgetless/configs/select_experiment.yaml``
(the recipe select -> train, one arm per method) run once per domain; this script sets each
domain's data and renders the table.

Target (OGS): at least 90 % of the full-data domain gain with at most a third of the
full-data general drop (C4 perplexity), and not dominated by random or LESS on the
gain-vs-drop frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetless.config import load_raw
from forgetless.errors import ForgetlessError
from forgetless.evaluate.stats import format_correlation, read_evaluation
from forgetless.recipes.adapt import ADAPTED_EVAL, BASE_EVAL
from forgetless.recipes.compare import Comparison, compare, expand_arms, plan_comparison
from forgetless.report.experiment import (
    add_dry_run_flag,
    exit_with_error,
    experiment_parser,
    parse_experiment_args,
    print_event,
    print_plan_counts,
    shared_overrides,
    write_results,
)

PACKAGED_CONFIG = (
    Path(__file__).resolve().parents[1] / "src/forgetless/configs/select_experiment.yaml"
)


@dataclass(frozen=True)
class Domain:
    source: str
    split: str
    task: str  # held-out evaluation of the domain


DOMAINS = {
    "medical": Domain("pubmedqa", "train", "ppl:pubmedqa@test"),
    "financial": Domain("nwgi", "test", "ppl:financial_phrasebank"),
}
METHODS = ("random", "less", "orthogonal", "ogs")
RETENTION_TASK = "c4"
GAIN_TARGET, DROP_TARGET = 0.9, 1 / 3


def domain_arms(args, shared: dict, name: str) -> tuple[list, Path]:
    """The packaged comparison's arms (full pool and each selection, then training) on one
    domain, and its own run directory."""
    domain = DOMAINS[name]
    run_dir = Path(args.run_dir) / name
    raw = load_raw(
        args.config,
        {
            **shared,
            "run_dir": str(run_dir),
            "data.source": domain.source,
            "data.split": domain.split,
            "data.kind": "text",
            "compare.x_task": domain.task,
            "compare.y_task": RETENTION_TASK,
        },
    )
    arms = [arm for arm in expand_arms(raw, args.config) if arm.name in ("full", *args.methods)]
    return arms, run_dir


def summarise_domain(name: str, run: Comparison, arms: list) -> dict[str, Any]:
    frontier = run.frontier
    tasks = [*frontier["domain_tasks"], *frontier["general_tasks"]]
    base = read_evaluation(run.of(arms[0].label)[1][BASE_EVAL].directory)
    points = {point["arm"]: point for point in frontier["arms"]}
    rows: dict[str, dict[str, Any]] = {}
    for arm in arms:
        plan, results = run.of(arm.label)
        scores = read_evaluation(results[ADAPTED_EVAL].directory)[0]
        changes = points[arm.name]["changes"]
        row: dict[str, Any] = {
            "scores": {task: scores[task]["value"] for task in tasks},
            "changes": changes,
            "training": results["train"].summary,
            "domain_gain": -changes[DOMAINS[name].task]["change"],
            "general_drop": changes[RETENTION_TASK]["change"],
        }
        if arm.name != "full":
            selection = results[f"selection_{arm.config.select.method}"]
            row["selected"] = selection.summary["selected"]
            row["gradient_metrics"] = selection.summary.get("gradient_metrics")
            row["selection_seconds"] = sum(
                results[stage].seconds or 0.0 for stage in plan.training if stage != "train"
            )
        rows[arm.name] = row
    full = rows["full"]
    for label, row in rows.items():
        if label == "full":
            continue
        row["gain_share"] = (
            row["domain_gain"] / full["domain_gain"] if full["domain_gain"] > 0 else None
        )
        row["drop_share"] = (
            row["general_drop"] / full["general_drop"] if full["general_drop"] > 0 else None
        )
        row["dominated_by"] = [
            other
            for other, peer in rows.items()
            if other not in (label, "full")
            and peer["domain_gain"] >= row["domain_gain"]
            and peer["general_drop"] <= row["general_drop"]
            and (
                peer["domain_gain"] > row["domain_gain"]
                or peer["general_drop"] < row["general_drop"]
            )
        ]
    verdict = None
    if "ogs" in rows:
        ogs = rows["ogs"]
        verdict = {
            "gain_share_ok": ogs["gain_share"] is not None and ogs["gain_share"] >= GAIN_TARGET,
            "drop_share_ok": ogs["drop_share"] is not None and ogs["drop_share"] <= DROP_TARGET,
            "not_dominated_by_random_or_less": not ({"random", "less"} & set(ogs["dominated_by"])),
        }
        verdict["navigator"] = run.of("ogs")[1]["navigator"].summary
    return {
        "domain": vars(DOMAINS[name]),
        "base_scores": {task: base[0][task]["value"] for task in tasks},
        "rows": rows,
        "ogs_target": verdict,
        "frontier": str(run.directory / "frontier.html"),
    }


def _change(change: dict) -> str:
    low, high = change["ci95"]
    return f"{change['change']:+.1f} [{low:+.1f}, {high:+.1f}]"


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def render(summary: dict, args) -> str:
    train = summary["train"]
    tasks = [*summary["evaluate"]["domain_tasks"], *summary["evaluate"]["general_tasks"]]
    lines = [
        f"# Training data selection: {summary['model']}",
        "",
        f"Every model: full fine-tuning, {train['max_steps']} steps of {train['batch_size']} x "
        f"{train['max_length']} packed tokens, lr {train['learning_rate']:g} "
        f"({train['lr_scheduler']}), on {100 * summary['budget']:.0f} % of the domain pool "
        "chosen by each method, or on the whole pool (full). Changes are paired against the "
        "base (95 % interval): perplexity in % (negative = better), accuracy in points. Gain "
        "share and drop share: the domain-perplexity gain and the C4-perplexity rise as shares "
        f"of full-data training's. OGS target: gain share ≥ {GAIN_TARGET:.0%}, drop share ≤ "
        f"{DROP_TARGET:.0%}, not dominated by random or LESS.",
    ]
    for name, domain in summary["domains"].items():
        lines += [
            "",
            f"## {name} ({domain['domain']['source']} → {domain['domain']['task']})",
            "",
            "| model | " + " | ".join(tasks) + " | gain share | drop share | dominated by |",
            "|---" * (len(tasks) + 4) + "|",
            "| base | "
            + " | ".join(f"{domain['base_scores'][task]:.4g}" for task in tasks)
            + " | | | |",
        ]
        for label, row in domain["rows"].items():
            cells = [_change(row["changes"][task]) for task in tasks]
            share = "" if label == "full" else _share(row["gain_share"])
            drop = "" if label == "full" else _share(row["drop_share"])
            dominated = ", ".join(row.get("dominated_by", [])) or ("" if label == "full" else "–")
            lines.append(
                f"| {label} | " + " | ".join(cells) + f" | {share} | {drop} | {dominated} |"
            )
        lines += [
            "",
            "| method | selected | epochs trained | orthogonality (sel. / pool) | "
            "utility (sel. / pool) | selection minutes |",
            "|---|---|---|---|---|---|",
        ]
        for label, row in domain["rows"].items():
            if "selected" not in row:
                continue
            metrics = row["gradient_metrics"] or {}

            def pair(key, metrics=metrics):
                if key not in metrics or metrics[key]["selected_mean"] is None:
                    return "–"
                return f"{metrics[key]['selected_mean']:.3f} / {metrics[key]['pool_mean']:.3f}"

            lines.append(
                f"| {label} | {row['selected']} | "
                f"{row['training']['epochs']:.1f} | "
                f"{pair('orthogonality')} | {pair('utility')} | "
                f"{row['selection_seconds'] / 60:.1f} |"
            )
        target = domain["ogs_target"]
        if target:
            folds = target["navigator"].get("cross_validation", {})
            lines += [
                "",
                f"OGS target — gain share met: {target['gain_share_ok']}; drop share met: "
                f"{target['drop_share_ok']}; not dominated by random or LESS: "
                f"{target['not_dominated_by_random_or_less']}.",
            ]
            if folds:
                lines.append(
                    f"Navigator, {folds['folds']}-fold cross-validated on {folds['samples']} "
                    "featured samples: Spearman "
                    f"{format_correlation(folds['spearman_vs_exact'])} with the exact score "
                    "(ridge on the same inputs "
                    f"{format_correlation(folds['ridge_spearman_vs_exact'])}); "
                    f"its top pick has utility {folds['navigator_top']['utility']:.3f} and cost "
                    f"{folds['navigator_top']['cost']:.3f} (exact choice "
                    f"{folds['exact_top']['utility']:.3f} / {folds['exact_top']['cost']:.3f})."
                )
    lines += ["", f"Command: `python scripts/select_results.py {' '.join(args.argv)}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(
        __doc__, PACKAGED_CONFIG, "runs/select_experiment", "docs/results/select"
    )
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_dry_run_flag(parser)
    args = parse_experiment_args(parser, argv)
    try:
        shared = shared_overrides(args)
        shared.pop("run_dir")  # one run directory per domain, below --run-dir
        domains = {}
        for name in args.domains:
            arms, run_dir = domain_arms(args, shared, name)
            if args.dry_run:
                print_plan_counts(name, plan_comparison(arms, run_dir))
                continue
            title = f"Selection on {name} data"
            run = compare(arms, run_dir, on_event=print_event, title=title)
            domains[name] = summarise_domain(name, run, arms)
    except ForgetlessError as error:
        exit_with_error(str(error))
    if args.dry_run:
        return
    config = arms[0].config
    summary = {
        "model": config.model.name,
        "budget": config.select.budget,
        "train": config.train.model_dump(mode="json"),
        "select": config.select.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "domains": domains,
    }
    write_results(args.output, summary, render(summary, args))


if __name__ == "__main__":
    main()
