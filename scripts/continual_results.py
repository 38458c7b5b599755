"""The continual-learning results table: methods x seed splits of one benchmark order.

Runs ``forgetless continual`` (cached and resumable, so an interrupted sweep picks up where it
stopped) for every method on each seed split, then writes one table of mean ± std over the
splits (average accuracy, BWT, FWT, forgetting, retention of the final model) to
``<output>.md`` and everything per run to ``<output>.json``::

    python scripts/continual_results.py --data-dir ../shared/data
    python scripts/continual_results.py --methods seqft osft --subsets 0_42 \\
        --set continual.eval_limit=100 --output docs/results/continual_pilot
    python scripts/continual_results.py --methods seqft sotu --set merge.keep=0.25 \\
        --set continual.head=closed_form --output docs/results/continual_sotu_closed_form

Seed split i (0_42, 1_142, 2_242) also sets ``train.seed = i``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from forgetless.config import load_config, parse_assignment
from forgetless.recipes.continual import run_continual
from forgetless.report.experiment import print_event, write_results

SUBSETS = ("0_42", "1_142", "2_242")
METHODS = ("seqft", "lora", "osft", "multitask")
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


def run_sweep(args: argparse.Namespace) -> list[dict]:
    reports = []
    # Split by split, so an interrupted sweep already compares every method on the first ones.
    for seed, subset in enumerate(args.subsets):
        for method in args.methods:
            overrides = dict(parse_assignment(item) for item in args.set or [])
            overrides.update(
                {
                    "continual.method": method,
                    "continual.subset": subset,
                    "continual.order": args.order,
                    "train.seed": SUBSETS.index(subset) if subset in SUBSETS else seed,
                    "run_dir": args.run_dir,
                    "data_dir": args.data_dir,
                }
            )
            config = load_config(args.config, overrides)
            print(f"== {method} on split {subset}", flush=True)
            results = run_continual(config, on_event=print_event)
            report_file = results["report"].directory / "continual.json"
            report = json.loads(report_file.read_text())
            reports.append(report)
    return reports


def render(reports: list[dict], args: argparse.Namespace) -> str:
    first = reports[0]
    evaluation = first["evaluation"]
    retention_tasks = [row["task"] for row in first["retention"]]
    lines = [
        f"# Continual learning: {first['benchmark']} order {first['order']}, {first['model']}",
        "",
        HEAD_NOTES[first["head"]],
        "",
        f"Seed splits: {', '.join(args.subsets)}; {evaluation['limit'] or 'all'} test items "
        f"per task ({evaluation['split']}); tasks in order: {', '.join(first['tasks'])}.",
        "Accuracy in %, mean ± std over the splits; BWT/FWT/forgetting in points.",
        "",
        "| method | avg accuracy | BWT | FWT | forgetting | "
        + " | ".join(f"{task} (final)" for task in retention_tasks)
        + " | train s |",
        "|---" * (6 + len(retention_tasks)) + "|",
    ]
    for method in args.methods:
        runs = [report for report in reports if report["method"] == method]
        metrics = [run["metrics"] for run in runs]
        cells = [
            mean_std([m["average_accuracy"] for m in metrics]),
            mean_std([m["bwt"] for m in metrics]),
            mean_std([m["fwt"] for m in metrics]),
            mean_std([m["forgetting"] for m in metrics]),
        ]
        for task in retention_tasks:
            rows = [row for run in runs for row in run["retention"] if row["task"] == task]
            scale = 100.0 if rows[0]["metric"] == "accuracy" else 1.0
            cells.append(mean_std([row["after"] for row in rows], scale))
        train_seconds = statistics.mean(run["timings"]["train_seconds"] for run in runs)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {train_seconds:.0f} |")
    base_cells = []
    for task in retention_tasks:
        row = next(row for row in first["retention"] if row["task"] == task)
        scale = 100.0 if row["metric"] == "accuracy" else 1.0
        base_cells.append(f"{task} {row['before'] * scale:.1f}")
    lines += ["", "Base model (before any task): " + ", ".join(base_cells) + "."]
    lines += ["", "## Accuracy matrices (rows: after training task i; columns: task j)", ""]
    for report in reports:
        lines.append(f"**{report['method']}, split {report['subset']}** (base row first)")
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
        "--methods", nargs="+", default=list(METHODS), choices=METHODS + OPTIONAL_METHODS
    )
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS))
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/continual")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", help="section.key=value, as in the CLI")
    parser.add_argument("--output", default="docs/results/continual_fewshot_order1")
    args = parser.parse_args(argv)
    reports = run_sweep(args)
    write_results(args.output, reports, render(reports, args))


if __name__ == "__main__":
    main()
