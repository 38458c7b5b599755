r"""The continual-learning results table: methods x runs (benchmark order and seed split).

Runs ``forgetless continual`` (cached and resumable, so an interrupted sweep picks up where it
stopped) for every method on each run, then writes, per order, one table of mean ± std over
its seed splits (average accuracy, BWT, FWT, forgetting, retention of the final model), one
more over all runs when there are several orders, the paired differences of every method's
final average accuracy against seqft and multitask on the same test items, to
``<output>.md``, and everything per run to ``<output>.json``::

    python scripts/continual_results.py --data-dir ../shared/data
    python scripts/continual_results.py --methods seqft osft --subsets 0_42 \
        --set continual.eval_limit=100 --output docs/results/continual_pilot
    python scripts/continual_results.py --config src/forgetless/configs/continual_benchmark.yaml \
        --runs 1:0_42 2:0_42 3:0_42 1:1_142 1:2_242 --methods seqft lora olora replay ewc osft \
        multitask --output docs/results/continual_benchmark

``--runs ORDER:SPLIT ...`` lists the runs; without it, ``--order`` with every ``--subsets``.
``--method-set METHOD:section.key=value`` sets something for one method only (LoRA's own
learning rate). Any method may be named with a variant, ``osft@lr3e-4`` or ``sotu@disjoint``,
whose settings come from ``--method-set`` and which gets a row of its own
(``continual.variant``): a merging method's variant merges the experts that every variant of the
run shares, any other trains a sequence of its own::

    python scripts/continual_results.py --methods seqft sotu sotu@disjoint sotu@average \
        --method-set sotu@disjoint:merge.masks=disjoint \
        --method-set sotu@average:merge.method=task_arithmetic \
        --method-set "sotu@average:merge.scale=0.25"
    python scripts/continual_results.py --methods osft osft@lr3e-4 --references osft \
        --method-set osft@lr3e-4:train.learning_rate=3e-4
Seed split i (0_42, 1_142, 2_242) also sets ``train.seed = i``. Runs go split by split and
order by order, every method within each, so an interrupted sweep already compares all
methods on the runs it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from forgetless.config import load_config, parse_assignment
from forgetless.errors import ForgetlessError
from forgetless.recipes.continual import plan_continual, run_continual
from forgetless.report.continual import pooled_paired_difference, short_name
from forgetless.report.experiment import (
    add_dry_run_flag,
    exit_with_error,
    print_event,
    print_plan_counts,
    write_results,
)

SUBSETS = ("0_42", "1_142", "2_242")
METHODS = ("seqft", "lora", "osft", "multitask")
# What every method is paired against by default: the lower and the upper bound.
REFERENCES = ("seqft", "multitask")
# Per-task experts merged after every task (compared with seqft in docs/merge.md), and the
# baselines from the continual-learning literature.
OPTIONAL_METHODS = ("sotu", "replay", "ewc", "olora")
PACKAGED_CONFIG = (
    Path(__file__).resolve().parents[1] / "src/forgetless/configs/continual_fewshot.yaml"
)


HEAD_NOTES = {
    "lm": "Head: the language model itself (each task's labels scored as text).",
    "closed_form": "Head: closed-form, class-incremental (random projection + ridge over the "
    "classes of every task seen so far; a task not reached yet scores 0, so FWT is not "
    "reported). The base row is the base model with its LM head, for reference.",
}


def mean_std(values: list[float | None], scale: float = 100.0) -> str:
    present = [value * scale for value in values if value is not None]
    if not present:
        return "n/a"
    if len(present) == 1:
        return f"{present[0]:.1f}"
    return f"{statistics.mean(present):.1f} ± {statistics.stdev(present):.1f}"


def label(report: dict) -> str:
    """The method as the tables name it: ``sotu``, or ``sotu@disjoint`` for a variant."""
    variant = report.get("variant")
    return f"{report['method']}@{variant}" if variant else report["method"]


def method_and_variant(text: str) -> tuple[str, str | None]:
    method, _, variant = text.partition("@")
    if method not in METHODS + OPTIONAL_METHODS:
        exit_with_error(
            f"--methods: {method!r} is not one of {', '.join(METHODS + OPTIONAL_METHODS)}"
        )
    return method, variant or None


def sweep_runs(args: argparse.Namespace) -> list[tuple[int, str]]:
    if not args.runs:
        return [(args.order, subset) for subset in args.subsets]
    runs = []
    for run in args.runs:
        order, _, subset = run.partition(":")
        if not order.isdigit() or not subset:
            exit_with_error(f"--runs takes ORDER:SPLIT (e.g. 1:0_42), got {run!r}")
        runs.append((int(order), subset))
    return runs


def method_settings(items: list[str], method: str) -> dict:
    """The ``METHOD:section.key=value`` settings of ``method`` (e.g. its own learning rate)."""
    settings = {}
    for item in items:
        name, separator, assignment = item.partition(":")
        if not separator or "=" not in assignment:
            exit_with_error(f"--method-set takes METHOD:section.key=value, got {item!r}")
        if name == method:
            settings.update([parse_assignment(assignment)])
    return settings


def sweep_configs(args: argparse.Namespace):
    """(label, config) of every run of the sweep, in the order it runs them."""
    for order, subset in sweep_runs(args):
        for name in args.methods:
            method, variant = method_and_variant(name)
            overrides = dict(parse_assignment(item) for item in args.set or [])
            overrides.update(method_settings(args.method_set or [], name))
            overrides.update(
                {
                    "continual.method": method,
                    "continual.variant": variant,
                    "continual.subset": subset,
                    "continual.order": order,
                    "train.seed": SUBSETS.index(subset) if subset in SUBSETS else 0,
                    "data_dir": args.data_dir,
                }
            )
            if args.run_dir:
                overrides["run_dir"] = args.run_dir
            yield f"{name} on order {order}, split {subset}", load_config(args.config, overrides)


def run_sweep(args: argparse.Namespace) -> list[dict]:
    reports = []
    for label, config in sweep_configs(args):
        print(f"== {label}", flush=True)
        results = run_continual(config, on_event=print_event)
        reports.append(json.loads((results["report"].directory / "continual.json").read_text()))
    return reports


def print_plan(args: argparse.Namespace) -> None:
    """--dry-run: how many stages of each run are finished, archived or left to run."""
    for label, config in sweep_configs(args):
        print_plan_counts(label, plan_continual(config))


def read_against(item: str) -> tuple[str, list[dict]]:
    """--against NAME=RESULTS.json: the reports of another sweep, or a one-line error."""
    name, _, path = item.partition("=")
    if not name or not path:
        exit_with_error(f"--against {item}: give NAME=RESULTS.json")
    try:
        reports = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        exit_with_error(f"--against {item}: cannot read {path}: {error}")
    if not isinstance(reports, list) or not all(
        isinstance(r, dict) and {"order", "subset", "method"} <= r.keys() for r in reports
    ):
        exit_with_error(f"--against {item}: {path} is not a continual_results.py results file")
    return name, reports


def paired_lines(
    reports: list[dict],
    methods: list[str],
    references: list[str],
    against: dict[str, list[dict]] | None = None,
) -> list[str]:
    """Each method's final average accuracy against each reference method, and against the
    same method in each ``against`` results file (another sweep's JSON: the same runs under
    other settings), paired on the same items of every run both finished, pooled over those
    runs."""

    def by_run(of: list[dict]) -> dict[tuple, dict]:
        return {(r["order"], r["subset"], label(r)): r for r in of if r.get("final_items")}

    runs = by_run(reports)
    # (header, the runs to pair with, the method paired with; None: the same method)
    columns = [(f"vs {reference}", runs, reference) for reference in references]
    columns += [
        (f"vs {name} (same method)", by_run(of), None) for name, of in (against or {}).items()
    ]
    if not columns or (len(runs) < 2 and not against):  # e.g. runs from before outcomes were kept
        return []
    lines = [
        "## Paired differences of final average accuracy (points, 95 % interval over items)",
        "",
        "Each cell: the method's final average accuracy minus the reference's, on the same "
        "test items, pooled over the runs both have (their count in brackets); runs of one "
        "seed split share their test items, and the interval counts those items once.",
        "",
        "| method | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---" * (1 + len(columns)) + "|",
    ]
    for method in methods:
        cells = []
        for _, paired_runs, reference in columns:
            # The orders of one seed split are scored on the same test items.
            by_items: dict[str | None, list[tuple[dict, dict]]] = {}
            for (order, subset, name), r in runs.items():
                other = paired_runs.get((order, subset, reference or method))
                if name == method and other is not None and other is not r:
                    by_items.setdefault(subset, []).append((r["final_items"], other["final_items"]))
            if not by_items:
                cells.append("–")
                continue
            mean, low, high = pooled_paired_difference(list(by_items.values()))
            count = sum(len(group) for group in by_items.values())
            cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] ({count})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def training_cost(runs: list[dict]) -> list[str]:
    """Tokens trained on and training seconds (mean over the runs), and the peak memory of any
    training stage: arms that train on more tokens (replay's buffer) show it. A merge stage
    (sotu) counts among the training stages and trains on no tokens."""
    tokens = statistics.mean(
        sum(stage.get("input_tokens_seen", 0) for stage in run["training"]) for run in runs
    )
    seconds = statistics.mean(run["timings"]["train_seconds"] for run in runs)
    peaks = [
        stage["peak_memory_mb"]
        for run in runs
        for stage in run["training"]
        if stage.get("peak_memory_mb") is not None
    ]
    return [f"{tokens:,.0f}", f"{seconds:.0f}", f"{max(peaks):,.0f}" if peaks else "n/a"]


def distinct_models(runs: list[dict]) -> list[dict]:
    """The runs of one method, each trained model once: a method trained once on every task
    (multitask) does not depend on the order, so the orders of one seed split share its
    model (the same stage, cached), which must not count as several runs."""
    by_model: dict[tuple, dict] = {}
    for run in runs:
        order = run["order"] if len(run["matrix"]) > 1 else None
        by_model.setdefault((order, run["subset"]), run)
    return list(by_model.values())


def summary_table(reports: list[dict], methods: list[str]) -> list[str]:
    """Mean ± std over the runs given (an order's seed splits, or every run), one row per
    method with the number of runs it has: a sweep still running shows what it has."""
    retention_tasks = [row["task"] for row in reports[0]["retention"]]
    header = ["method", "runs", "avg accuracy", "BWT", "FWT", "forgetting"]
    header += [f"{task} (final)" for task in retention_tasks]
    header += ["train tokens", "train s", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in methods:
        runs = distinct_models([report for report in reports if label(report) == method])
        if not runs:
            continue
        metrics = [run["metrics"] for run in runs]
        cells = [
            str(len(runs)),
            mean_std([m["average_accuracy"] for m in metrics]),
            mean_std([m["bwt"] for m in metrics]),
            mean_std([m["fwt"] for m in metrics]),
            mean_std([m["forgetting"] for m in metrics]),
        ]
        for task in retention_tasks:
            rows = [row for run in runs for row in run["retention"] if row["task"] == task]
            scale = 100.0 if rows[0]["metric"] == "accuracy" else 1.0
            cells.append(mean_std([row["after"] for row in rows], scale))
        cells += training_cost(runs)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    base_cells = []
    for task in retention_tasks:
        row = next(row for row in reports[0]["retention"] if row["task"] == task)
        scale = 100.0 if row["metric"] == "accuracy" else 1.0
        base_cells.append(f"{task} {row['before'] * scale:.1f}")
    if base_cells:
        lines += ["", "Base model (before any task): " + ", ".join(base_cells) + "."]
    return lines


def render(reports: list[dict], args: argparse.Namespace) -> str:
    first = reports[0]
    evaluation = first["evaluation"]
    items = ", ".join(f"{short_name(t)} {n}" for t, n in evaluation["items"].items())
    lines = [
        f"# Continual learning: {first['benchmark']}, {first['model']}",
        "",
        HEAD_NOTES[first["head"]],
        "",
        f"Test items per task ({evaluation['split']}): {items}.",
        "Accuracy in %, mean ± std over the seed splits of an order; BWT/FWT/forgetting in points.",
        "",
    ]
    orders = list(dict.fromkeys(report["order"] for report in reports))
    for order in orders:
        of_order = [report for report in reports if report["order"] == order]
        splits = ", ".join(dict.fromkeys(report["subset"] or "-" for report in of_order))
        lines += [
            f"## Order {order}: {', '.join(of_order[0]['tasks'])} (splits {splits})",
            "",
            *summary_table(of_order, args.methods),
            "",
        ]
    if len(orders) > 1:
        runs = len({(report["order"], report["subset"]) for report in reports})
        lines += [
            f"## All runs ({runs} runs over orders {', '.join(map(str, orders))})",
            "",
            "Each run (order and seed split) counts once; a model trained once on every task "
            "(multitask) does not depend on the order and counts once per seed split.",
            "",
            *summary_table(reports, args.methods),
            "",
        ]
    lines += paired_lines(reports, args.methods, args.references, args.against)
    lines += ["## Accuracy matrices (rows: after training task i; columns: task j)", ""]
    for report in reports:
        lines.append(
            f"**{label(report)}, order {report['order']}, split {report['subset']}** "
            "(base row first)"
        )
        lines.append("")
        lines.append("| after \\ on | " + " | ".join(report["tasks"]) + " |")
        lines.append("|---" * (len(report["tasks"]) + 1) + "|")
        base_label = "base" if report["head"] == "lm" else "base (LM head)"
        lines.append(
            f"| {base_label} | " + " | ".join(f"{v * 100:.0f}" for v in report["base"]) + " |"
        )
        stages = report["tasks"] if len(report["matrix"]) > 1 else ["all tasks"]
        for name, row in zip(stages, report["matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(f"{v * 100:.0f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=PACKAGED_CONFIG)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="each METHOD or METHOD@VARIANT, METHOD one of "
        + ", ".join(METHODS + OPTIONAL_METHODS),
    )
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS))
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument(
        "--runs", nargs="+", help="ORDER:SPLIT pairs (e.g. 1:0_42 2:0_42); overrides --order."
    )
    parser.add_argument(
        "--run-dir", help="where the runs' stages go (default: the config's run_dir)"
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", help="section.key=value, as in the CLI")
    parser.add_argument(
        "--method-set", action="append",
        help="METHOD:section.key=value, for one method only (e.g. lora:train.learning_rate=3e-4)",
    )  # fmt: skip
    parser.add_argument(
        "--references",
        nargs="+",
        help="methods every other method's final average accuracy is paired against "
        f"(default: those of {', '.join(REFERENCES)} among --methods)",
    )
    parser.add_argument(
        "--against",
        action="append",
        metavar="NAME=RESULTS.json",
        help="pair every method with the same method in another sweep's results file (the same "
        "runs under other settings), in a column 'vs NAME' (repeatable)",
    )
    parser.add_argument("--output", default="docs/results/continual_fewshot_order1")
    add_dry_run_flag(parser)
    args = parser.parse_args(argv)
    for name in args.methods:
        method_and_variant(name)  # a misspelt method fails before any run
    for name in args.references or []:
        if name not in args.methods:
            exit_with_error(f"--references {name}: not among --methods")
    args.references = args.references or [m for m in REFERENCES if m in args.methods]
    args.against = dict(read_against(item) for item in args.against or [])
    try:
        if args.dry_run:
            return print_plan(args)
        reports = run_sweep(args)
    except ForgetlessError as error:
        exit_with_error(str(error))
    write_results(args.output, reports, render(reports, args))


if __name__ == "__main__":
    main()
