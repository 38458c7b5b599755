"""The flags the commands share, and how flags and ``--set`` become one validated config:
each flag that sets a config key takes its help, choices and default from the schema or the
method registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from forgetless import registry
from forgetless.config import (
    METHOD_SECTIONS,
    ForgetlessConfig,
    load_config,
    parse_assignment,
)
from forgetless.errors import ForgetlessError

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see `forgetless config`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field: section.key=value (repeatable)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON on stdout (logs stay on stderr).")
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="List every stage with what a run would do with it (finished, in archive, to "
        "run), and run nothing.",
    ),
]
RunDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output-dir",
        "-o",
        help="Run directory: finished stages are cached there. [default: run_dir of the config]",
    ),
]


# Config keys set by a flag whose name is not the key's last part.
FLAG_NAMES = {
    "model.name": "--model",
    "data.source": "--data",
    "data.revision": "--data-revision",
    "select.anchor.source": "--anchor",
    "run_dir": "--output-dir",
}


def _flag(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def _setting(key: str) -> FieldInfo:
    section: Any = ForgetlessConfig
    for part in key.split("."):
        field = section.model_fields[part]
        section = field.annotation
    return field


def _fixed_choices(key: str) -> tuple[str, ...]:
    family = key.removesuffix(".method")
    if family != key and family in METHOD_SECTIONS:
        return registry.names(family)
    annotation = _setting(key).annotation
    for member in (annotation, *get_args(annotation)):
        if get_origin(member) is Literal:
            return tuple(str(choice) for choice in get_args(member))
    return ()


def _default_text(key: str, defaults: dict[str, Any] | None) -> str | bool:
    if defaults is not None and key in defaults:
        value = defaults[key]
    else:
        value = _setting(key).get_default(call_default_factory=True)
    if value is None or value == [] or value == {}:
        return False
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def config_option(key: str, help: str, *, defaults: dict[str, Any] | None = None, **kwargs: Any):
    """A flag that sets config ``key``: help with its choices (from the method registry or
    the schema's Literal) and its default (the schema's, or ``defaults``, dotted keys)."""
    choices = _fixed_choices(key)
    return typer.Option(
        help=help,
        metavar=f"[{'|'.join(choices)}]" if choices else None,
        show_default=_default_text(key, defaults),
        **kwargs,
    )


DataDirOpt = Annotated[
    str | None,
    typer.Option(
        help="Data directory. [default: $FORGETLESS_DATA_DIR, then the user cache]",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    config_option(
        "model.name",
        "Hub id, local checkpoint, or alias (smollm2-135m, tiny-llama, random:<shape>).",
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Upload the model and its card to this hub repository (checked before any work).",
    ),
]
PrivateOpt = Annotated[bool, typer.Option(help="Create the --push-to-hub repository as private.")]
DataRevisionOpt = Annotated[
    str | None, config_option("data.revision", "Branch, tag or commit of a hub data set.")
]
RevisionOpt = Annotated[
    str | None, config_option("model.revision", "Branch, tag or commit of a hub model.")
]


def config_overrides(
    assignments: list[str] | None, flags: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config overrides of ``--set`` and the flags, and which option set each key."""
    overrides = dict(parse_assignment(text) for text in assignments or [])
    labels = {key: f"--set {key}" for key in overrides}
    # An unset flag must not erase a value given with --set.
    given = {key: value for key, value in flags.items() if value is not None}
    overrides.update(given)
    labels.update({key: _flag(key) for key in given})
    return overrides, labels


def cli_config(path: Path | None, assignments: list[str] | None, flags: dict[str, Any]):
    overrides, labels = config_overrides(assignments, flags)
    return load_config(path, overrides, labels)


def split_tasks(tasks: str | None) -> list[str] | None:
    if tasks is None:
        return None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise ForgetlessError("--tasks needs at least one task name")
    return names


def check_push(repo: str | None, private: bool) -> None:
    """Before any work: a push that cannot happen must not cost a training run first."""
    if repo is None:
        if private:
            raise ForgetlessError("--private applies to --push-to-hub REPO, which is not given")
        return
    from forgetless.hub import check_push_access

    check_push_access(repo)
