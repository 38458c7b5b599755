"""Where a command's result goes: standard output holds only the result (a table, or JSON
with --json); logs, progress and library messages go to standard error."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from forgetless.runs import count_states

err = Console(stderr=True)
# Where results go: the real standard output. While a command runs, everything else printed
# there (the Trainer's log dicts, library messages) is sent to stderr, so stdout holds only
# the result: a table, or valid JSON with --json.
_results: dict[str, Any] = {"stream": None}


def out() -> Console:
    return Console(file=_results["stream"] or sys.stdout)


def emit(data: Any, show: Callable[[], None] | None = None, as_json: bool = False) -> None:
    """The command's result: JSON with --json (or when there is no human form), else ``show``."""
    if as_json or show is None:
        stream = _results["stream"] or sys.stdout
        stream.write(json.dumps(data, indent=2, default=str) + "\n")
        stream.flush()
    else:
        show()


def logs_to_stderr(command: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(command)  # typer reads the wrapped signature for the options
    def run(*args: Any, **kwargs: Any) -> None:
        _results["stream"] = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                command(*args, **kwargs)
        finally:
            _results["stream"] = None

    return run


def format_optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def print_markdown(path: Path) -> None:
    # Tables must stay one row per line whatever the terminal width.
    out().print(path.read_text(), markup=False, highlight=False, soft_wrap=True)


def print_table(table: Table) -> None:
    # A terminal folds cells to its width; piped output (docs, grep) keeps one row per line.
    console = out()
    (console if console.is_terminal else Console(file=console.file, width=250)).print(table)


def print_fields(summary: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key, value in summary.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    print_table(table)


def print_plan(planned: list, as_json: bool) -> None:
    """A dry run's result: every stage (a :class:`forgetless.runs.PlannedStage`) with its
    state, and on stderr how many are in each state."""
    rows = [dataclasses.asdict(stage) for stage in planned]

    def show() -> None:
        table = Table(*(rows[0] if rows else ()))
        for row in rows:
            table.add_row(*row.values())
        print_table(table)

    emit(rows, show, as_json)
    err.print(f"dry run: {count_states(planned)}")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def stage_event(event: str, info: Any) -> None:
    if event == "start":
        err.print(f"[bold]▶ {info}[/bold]")
    elif event == "cached":
        err.print(f"[dim]✓ {info.name} (cached in {info.directory})[/dim]")
    elif event == "done":
        err.print(f"[green]✓ {info.name}[/green] → {info.directory}")
    elif event == "pushed":
        err.print(f"pushed → {info}", markup=False)
