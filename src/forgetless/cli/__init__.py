"""The ``forgetless`` command line: a thin layer over the Python API.

Every command reads the one config schema (``--config file.yaml``), lets its flags and
``--set section.key=value`` override it, and reports user mistakes as one line on stderr with
exit code 2, never a traceback. The commands live in this package's modules by topic;
importing them registers them on :data:`forgetless.cli.app.app`.
"""

from __future__ import annotations

import itertools
import sys

import typer

from forgetless.cli import adapt, methods, mix, tools  # noqa: F401  (registers the commands)
from forgetless.cli.app import app
from forgetless.cli.output import err
from forgetless.errors import ForgetlessError


def _command_names() -> list[str]:
    """Every command and sub-command, as typed after `forgetless`."""

    def name(info) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    names = [name(info) for info in app.registered_commands]
    for group in app.registered_groups:
        names += [f"{group.name} {name(info)}" for info in group.typer_instance.registered_commands]
    return names


def _is_usage_error(error: Exception) -> bool:
    # Typer vendors its own copy of click, so match click's exception interface rather than
    # one particular class.
    return hasattr(error, "format_message") and hasattr(error, "exit_code")


# Options that take several values after one flag (`--experts A B C`), which click cannot
# parse natively; they are rewritten to the repeated form click understands.
MULTI_VALUE_OPTIONS = ("--experts", "--sources", "--weights", "--densities")


def _expand_multi_value_options(argv: list[str]) -> list[str]:
    expanded: list[str] = []
    current: str | None = None
    for token in argv:
        if token.startswith("-"):
            current = token if token in MULTI_VALUE_OPTIONS else None
            if current is None:
                expanded.append(token)
            continue
        if current is not None:
            expanded.extend([current, token])
        else:
            expanded.append(token)
    return expanded


# Output flags renamed to one scheme (--output-dir for folders, --output for files); the old
# spellings get a message instead of click's "no such option".
RENAMED_FLAGS = {
    **{
        command: {"--run-dir": "--output-dir"}
        for command in ("run", "compare", "demo", "continual")
    },
    **{
        command: {"--output": "--output-dir"}
        for command in ("merge", "select", "mix cluster", "mix search")
    },
    "mix sample": {"--to": "--output (and the run directory is --output-dir)"},
}


def _check_renamed_flags(argv: list[str]) -> None:
    leading = list(itertools.takewhile(lambda token: not token.startswith("-"), argv))
    two_words = " ".join(leading[:2])
    renamed = RENAMED_FLAGS.get(two_words) or RENAMED_FLAGS.get(" ".join(leading[:1]), {})
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in renamed:
            raise ForgetlessError(f"{flag} was renamed {renamed[flag]}")


def main(argv: list[str] | None = None) -> None:
    argv = _expand_multi_value_options(sys.argv[1:] if argv is None else list(argv))
    try:
        _check_renamed_flags(argv)
        app(args=argv, standalone_mode=False)
    except ForgetlessError as error:
        # One line whatever a library put in the message it wraps.
        message = " ".join(str(error).split())
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted; rerun the same command to resume", markup=False)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except OSError as error:
        # A path that cannot be written or read (permissions, a full disk, a file where a
        # folder should be) is the user's to fix; anything else keeps its traceback.
        if error.filename is None:
            raise
        err.print(
            f"error: {error.filename}: {error.strerror or error}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except Exception as error:
        if not _is_usage_error(error):
            raise
        message = " ".join(error.format_message().split())
        if message:  # empty when click has just shown the help of a bare command group
            err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


COMMAND_NAMES = _command_names()
