"""What the experiment scripts in ``scripts/`` share: their common flags, the config
overrides those flags make, and a one-line print of each stage event."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from forgetless.config import parse_assignment
from forgetless.io import write_json_atomic, write_text_atomic
from forgetless.runs import count_states


def exit_with_error(message: str) -> NoReturn:
    """A user's mistake: one line on stderr and exit code 2, as the forgetless commands give."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def experiment_parser(doc: str, config: Path, run_dir: str, output: str) -> argparse.ArgumentParser:
    """A parser with --config, --run-dir, --data-dir, --set and --output; add the rest."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--run-dir", default=run_dir)
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", help="section.key=value, as in the CLI")
    parser.add_argument("--output", default=output)
    return parser


def parse_experiment_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parsed arguments, with ``argv`` kept for the command line printed under each table."""
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def add_quick_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="tiny-llama on a few records: every step, fast."
    )


def default_paths(args: argparse.Namespace, name: str) -> None:
    """--run-dir and --output when not given: runs/<name> and docs/results/<name>, or with
    --quick (where the script has the flag) runs/<name>_quick and a result inside it (never
    over the published one)."""
    quick, quick_dir = getattr(args, "quick", False), f"runs/{name}_quick"
    args.run_dir = args.run_dir or (quick_dir if quick else f"runs/{name}")
    args.output = args.output or (f"{quick_dir}/{name}" if quick else f"docs/results/{name}")


def experiment_overrides(args: argparse.Namespace, quick: dict[str, Any]) -> dict[str, Any]:
    """--quick's settings, then those of --set, --run-dir and --data-dir."""
    return {**(quick if args.quick else {}), **shared_overrides(args)}


def shared_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides from --set, --run-dir and --data-dir (raises on a malformed --set)."""
    shared = dict(parse_assignment(item) for item in args.set or [])
    shared.update({"run_dir": args.run_dir, "data_dir": args.data_dir})
    return shared


def add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print how many stages are finished, archived or left to run; run nothing.",
    )


def print_plan_counts(label: str, planned: list) -> None:
    """A dry run's line: how many of ``planned`` (:class:`forgetless.runs.PlannedStage`) are
    in each state."""
    print(f"{label}: {count_states(planned)}", flush=True)


def print_event(event: str, info) -> None:
    print(f"   {event}: {getattr(info, 'name', info)}", flush=True)


def write_results(output: str | Path, results: Any, table: str) -> None:
    """Write ``<output>.json`` and the markdown ``<output>.md``, and print the table."""
    output = Path(output)
    write_json_atomic(output.with_suffix(".json"), results)
    write_text_atomic(output.with_suffix(".md"), table + "\n")
    print(table)
