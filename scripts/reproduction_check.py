r"""Does a rerun reproduce a published results table? Compare two results JSONs of one script.

Every paired change against the base in a results file (a mapping with ``change`` and
``ci95``, wherever it sits: ``rows[...].changes``, ``changes.<arm>``, ``domains.<d>.rows...``)
is matched by its path in the other file. For each, the published change with its 95 %
interval, the rerun's change, their difference, and whether the rerun's change falls inside
the published interval, the criterion "within noise" of the README. Prints a Markdown table
and a summary line; ``--output`` also writes it with a JSON beside it::

    python scripts/reproduction_check.py docs/results/domain_merge.json \\
        runs/domain_merge_rerun.json --output runs/domain_merge_reproduction
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from forgetless.report.experiment import exit_with_error, write_results


def paired_changes(document: Any, path: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every ``{"change", "ci95", ...}`` mapping in ``document`` by its dotted path."""
    found: dict[str, dict] = {}
    if isinstance(document, dict):
        if "change" in document and "ci95" in document:
            return {".".join(path): document}
        for key, value in document.items():
            found.update(paired_changes(value, (*path, str(key))))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            label = value.get("model") if isinstance(value, dict) else None
            found.update(paired_changes(value, (*path, str(label or index))))
    return found


def compare_changes(published: dict[str, dict], rerun: dict[str, dict]) -> dict[str, Any]:
    rows = []
    for path, before in published.items():
        after = rerun.get(path)
        if after is None:
            continue
        low, high = before["ci95"]
        rows.append(
            {
                "path": path,
                "unit": before.get("unit"),
                "published": before["change"],
                "published_ci95": [low, high],
                "rerun": after["change"],
                "difference": after["change"] - before["change"],
                "within_interval": low <= after["change"] <= high,
            }
        )
    within = sum(row["within_interval"] for row in rows)
    return {
        "compared": len(rows),
        "within_interval": within,
        "only_published": sorted(set(published) - set(rerun)),
        "only_rerun": sorted(set(rerun) - set(published)),
        "largest_difference": max((abs(row["difference"]) for row in rows), default=None),
        "rows": rows,
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Reproduction of {args.published}",
        "",
        f"Rerun: {args.rerun}. {result['within_interval']} of {result['compared']} paired "
        "changes fall inside the published 95 % interval.",
        "",
        "| change | unit | published [95 % interval] | rerun | difference | inside |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        low, high = row["published_ci95"]
        lines.append(
            f"| {row['path']} | {row['unit'] or ''} | {row['published']:+.2f} "
            f"[{low:+.2f}, {high:+.2f}] | {row['rerun']:+.2f} | {row['difference']:+.2f} | "
            f"{'yes' if row['within_interval'] else '**no**'} |"
        )
    for key, name in (("only_published", "published only"), ("only_rerun", "rerun only")):
        if result[key]:
            lines += ["", f"Changes in the {name}: " + ", ".join(result[key]) + "."]
    return "\n".join(lines)


def read(path: Path) -> dict[str, dict]:
    try:
        changes = paired_changes(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        exit_with_error(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
    except (OSError, UnicodeDecodeError) as error:
        exit_with_error(f"{path}: {getattr(error, 'strerror', None) or error}")
    for name, entry in changes.items():
        interval = entry["ci95"]
        if not isinstance(interval, list) or len(interval) != 2:
            exit_with_error(f"{path}: {name}.ci95 is not a [low, high] pair")
        values = [entry["change"], *interval]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            exit_with_error(f"{path}: {name} holds a non-finite or non-numeric change")
    if not changes:
        exit_with_error(f"{path}: no paired changes (change and ci95) in it")
    return changes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("published", type=Path, help="The published results JSON.")
    parser.add_argument("rerun", type=Path, help="The rerun's results JSON.")
    parser.add_argument("--output", type=Path, help="Also write <output>.md and <output>.json.")
    args = parser.parse_args(argv)
    result = compare_changes(read(args.published), read(args.rerun))
    if result["compared"] == 0:
        exit_with_error(f"{args.rerun}: none of its changes matches one of {args.published}")
    table = render(result, args)
    if args.output:
        write_results(args.output, result, table)
    else:
        print(table)


if __name__ == "__main__":
    main()
