"""The Typer application and its command groups; commands register with :func:`cli_command`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from forgetless.cli.output import logs_to_stderr, out

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Adapt Hugging Face causal LMs to a domain or a task sequence without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)
data_app = typer.Typer(help="Built-in data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
mix_app = typer.Typer(
    help="Data mixtures (CLIMB): cluster a pool, search weights.", no_args_is_help=True
)
app.add_typer(mix_app, name="mix")
lm_eval_app = typer.Typer(
    help="lm-evaluation-harness both ways: export our tasks, run lm-eval tasks on our models.",
    no_args_is_help=True,
)
app.add_typer(lm_eval_app, name="lm-eval")


def cli_command(group: typer.Typer, name: str | None = None):
    def register(command: Callable[..., None]) -> Callable[..., None]:
        return group.command(name)(logs_to_stderr(command))

    return register


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from forgetless import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers"))
    out().print(f"forgetless {__version__} ({libraries})", markup=False, highlight=False)
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Adapt Hugging Face causal LMs to a domain or a task sequence without forgetting."""
