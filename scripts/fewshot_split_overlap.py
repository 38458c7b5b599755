"""How many test items the few-shot benchmark's seed splits share, among the items the
continual benchmark evaluates (``continual.eval_limit`` per task, drawn as the runs draw them).

``scripts/continual_results.py`` pools paired intervals over seed splits as if their test items
were independent samples; this prints how far that holds::

    python scripts/fewshot_split_overlap.py --data-dir ../shared/data --limit 300
"""

from __future__ import annotations

import argparse
import itertools

from forgetless.data import load_records
from forgetless.data.builtin import FEWSHOT_SUBSETS
from forgetless.errors import ForgetlessError
from forgetless.recipes.continual import EVAL_SAMPLE_SEED, sample_records, task_sequence
from forgetless.report.experiment import exit_with_error

# Every order holds the same four tasks.
TASKS = task_sequence("fewshot", 1)


def evaluated_items(task: str, subset: str, split: str, limit: int | None, data_dir) -> set:
    records = load_records(
        task, kind="multiple_choice", split=split, subset=subset, data_dir=data_dir
    )
    # The text, choices and answer: a record's id is its line in one split's file.
    return {(r.query, r.choices, r.gold) for r in sample_records(records, limit, EVAL_SAMPLE_SEED)}


def overlap_table(data_dir, split: str, limit: int | None) -> list[str]:
    pairs = list(itertools.combinations(FEWSHOT_SUBSETS, 2))
    lines = [
        "| task | items per split | " + " | ".join(f"{a} ∩ {b}" for a, b in pairs) + " |",
        "|---" * (2 + len(pairs)) + "|",
    ]
    for task in TASKS:
        items = {s: evaluated_items(task, s, split, limit, data_dir) for s in FEWSHOT_SUBSETS}
        sizes = sorted({len(chosen) for chosen in items.values()})
        shared = [str(len(items[a] & items[b])) for a, b in pairs]
        lines.append(f"| {task} | {'/'.join(map(str, sizes))} | " + " | ".join(shared) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="The shared data directory (or FORGETLESS_DATA_DIR).")
    parser.add_argument("--split", default="test", choices=("test", "valid", "train"))
    parser.add_argument(
        "--limit", type=int, default=300, help="Items per task, as continual.eval_limit."
    )
    args = parser.parse_args(argv)
    if args.limit < 1:
        exit_with_error(f"--limit {args.limit}: must be at least 1")
    try:
        print("\n".join(overlap_table(args.data_dir, args.split, args.limit)))
    except ForgetlessError as error:
        exit_with_error(str(error))


if __name__ == "__main__":
    main()
