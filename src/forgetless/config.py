"""The one configuration schema, loadable from YAML and overridable from the command line.

The root composes the sections each package defines next to the code that uses them
(``train/config.py``, ``select/config.py``, ...). Every field carries its default and a
description; ``forgetless config`` prints them as a commented YAML file, so the documentation
of the defaults is generated from these modules. Method names are checked against the
registry (:mod:`forgetless.registry`), filled by :mod:`forgetless.catalog`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from forgetless import catalog, registry
from forgetless.data.config import DataConfig
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.merge.config import MergeConfig
from forgetless.mix.config import MixConfig
from forgetless.model_config import ModelConfig
from forgetless.recipes.config import CompareConfig, ContinualConfig, RecipeConfig
from forgetless.schema import NOT_IDENTITY, Section
from forgetless.select.config import SelectConfig
from forgetless.train.config import TrainConfig

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ForgetlessConfig",
    "MergeConfig",
    "MixConfig",
    "ModelConfig",
    "SelectConfig",
    "TrainConfig",
    "catalog",
    "defaults_as_yaml",
    "load_config",
    "load_raw",
    "parse_assignment",
    "set_dotted",
    "validate_config",
]

# Config sections whose `method` names a registered method of the family of the same name.
METHOD_SECTIONS = ("mix", "select", "train", "merge", "continual")


class ForgetlessConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to adapt.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig, description="Continual-learning harness."
    )
    merge: MergeConfig = Field(
        default_factory=MergeConfig, description="Merging fine-tuned experts into one model."
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig, description="Training data selection (OGS and baselines)."
    )
    mix: MixConfig = Field(
        default_factory=MixConfig, description="Clustering and data-mixture search (CLIMB)."
    )
    recipe: RecipeConfig = Field(
        default_factory=RecipeConfig, description="The steps `forgetless run` chains."
    )
    compare: CompareConfig = Field(
        default_factory=CompareConfig, description="The arms `forgetless compare` runs."
    )
    data_dir: str | None = Field(
        None,
        description="Directory with the data sets (reference layout: shared/data). "
        "Default: $FORGETLESS_DATA_DIR, else the user cache (downloaded when online).",
    )
    run_dir: str = Field("runs/default", description="Where stages write their artefacts.")
    archive_dir: str | None = Field(
        None,
        description="A second home for finished stages, e.g. a folder kept in version control "
        "or on shared storage: each stage leaves its record there, and its whole folder when "
        "no larger than `archive_max_mb` (evaluations, reports, selections; not models). A "
        "later run, in any run_dir or on another machine, restores them instead of "
        "recomputing, and skips a stage whose files were not kept (a model) when everything "
        "after it is there. None: no archive.",
        json_schema_extra=NOT_IDENTITY,
    )
    archive_max_mb: float = Field(
        16.0,
        ge=0,
        description="Largest stage folder the archive keeps whole (MiB); larger ones leave "
        "their record only.",
        json_schema_extra=NOT_IDENTITY,
    )

    @field_validator("data_dir")
    @classmethod
    def _existing_data_dir(cls, data_dir: str | None) -> str | None:
        # A mistyped data directory must fail here, not turn into a download (or be ignored
        # because this run reads only user files).
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise ValueError(f"{data_dir} is not a directory")
        return data_dir

    @model_validator(mode="after")
    def _registered_methods(self) -> ForgetlessConfig:
        for family in METHOD_SECTIONS:
            name = getattr(self, family).method
            if name not in registry.names(family):
                # A custom error carries the field's place, which an "after" validator's
                # error lacks, so the one-line message can name the line or flag that set it.
                raise PydanticCustomError(
                    "unregistered_method",
                    "{location} {name} is not one of: {choices}",
                    {
                        "location": f"{family}.method",
                        "name": repr(name),
                        "choices": ", ".join(registry.names(family)),
                    },
                )
        return self

    @model_validator(mode="after")
    def _selection_gradients_follow_the_target(self) -> ForgetlessConfig:
        gradient = self.select.gradient
        if gradient.parameters != "target":
            return self
        method = registry.lookup("train", self.train.method).implementation
        trained = method.trained_gradients(self.train)
        # Validated again: the resolved set must fit the other gradient settings.
        try:
            resolved = type(gradient).model_validate({**gradient.model_dump(), **trained})
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(
                f"select.gradient.parameters=target is {trained['parameters']} for train.method "
                f"{self.train.method}, and then {reason}"
            ) from None
        self.select.gradient = resolved
        return self


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
):
    """Load a YAML config (or the defaults) and apply dotted-key overrides on top.

    ``overrides`` maps dotted keys to values, e.g. ``{"train.learning_rate": 5e-4}``; values of
    ``None`` are ignored so unset CLI flags leave the file's value in place. ``labels`` names
    where an override came from (``--learning-rate``), so an invalid value is blamed on it.
    """
    return validate_config(load_raw(path, overrides), path, labels)


def load_raw(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML file's mapping (empty without a file), its ``extends`` chain resolved, with the
    overrides applied."""
    raw = _read_with_bases(Path(path), ()) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(raw, dotted, value)
    return raw


def _read_with_bases(file: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's sections over those of the file its ``extends`` key names.

    A section (or top-level key) the file sets replaces the base's whole, never merges into
    it: what a file writes in a section is everything that section holds, so a base cannot
    add, say, comparison arms that the extending file does not list. Single fields are
    changed with ``--set``. The base's path is relative to the extending file.
    """
    loaded = _read_yaml_mapping(file)
    base_name = loaded.pop("extends", None)
    if base_name is None:
        return loaded
    if not isinstance(base_name, str) or not base_name.strip():
        raise ForgetlessError(f"{file}: extends must name one config file, got {base_name!r}")
    base = (file.parent / base_name).resolve()
    here = chain + (file.resolve(),)
    if base in here:
        raise ForgetlessError(f"{file}: extends {base_name} makes a cycle")
    if not base.is_file():
        raise ForgetlessError(f"{file}: extends {base_name}, which is not a file")
    return {**_read_with_bases(base, here), **loaded}


def _read_yaml_mapping(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ForgetlessError(f"config file not found: {file}")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ForgetlessError(f"{where}: invalid YAML ({problem})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ForgetlessError(f"{file}: the top level must be a mapping of sections")
    return loaded or {}


def validate_config(
    raw: dict[str, Any],
    origin: str | Path | None = None,
    labels: dict[str, str] | None = None,
    within: tuple[str, ...] = (),
) -> ForgetlessConfig:
    """The validated config of a raw mapping; a mistake is one line naming ``origin`` (with the
    line that sets the invalid value, where ``origin`` is the file it came from), or the flag
    of ``labels`` (dotted key -> flag) that set it. ``within`` is where ``raw`` sits inside
    the file (a comparison arm's ``compare.arms.<name>``)."""
    try:
        return ForgetlessConfig.model_validate(raw)
    except ValidationError as err:
        raise ForgetlessError(_one_line(err, origin, labels or {}, within)) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a ``--set section.key=value`` flag; the value is read as YAML (numbers, lists)."""
    if "=" not in text:
        raise ForgetlessError(f"--set expects section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ForgetlessError(f"--set {key}: cannot parse value {value!r}") from None


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ForgetlessError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _one_line(
    err: ValidationError,
    path: str | Path | None,
    labels: dict[str, str],
    within: tuple[str, ...],
) -> str:
    first = err.errors()[0]
    origin = f"{path}: " if path is not None else ""
    # A check across sections has no loc; the registered-method check names its field.
    place = first.get("ctx", {}).get("location")
    keys = place.split(".") if place else [str(part) for part in first["loc"]]
    if path is not None and Path(path).is_file():
        found = (within and _where_set(Path(path), [*within, *keys])) or _where_set(
            Path(path), keys
        )
        if found:
            origin = f"{found}: "
    if within:
        origin += ".".join(within) + ": "
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    # A key or value may hold any character (a newline in a dict key): keep one line.
    message = " ".join(first["msg"].removeprefix("Value error, ").split())
    location = " ".join(".".join(keys).split())
    # A check across sections names its field in its own message.
    what = f"invalid value for {location}: " if first["loc"] else ""
    for key, label in labels.items():
        if location and (location == key or location.startswith(f"{key}.")):
            return f"{label}: {what}{message}{more}"
    if not first["loc"]:
        return f"{origin}invalid config: {message}{more}"
    return f"{origin}invalid config value for {location}: {message}{more}"


def _where_set(file: Path, keys: list[str]) -> str | None:
    """``file:line`` of the deepest of ``keys`` (a dotted location) that ``file``, or a file it
    extends, writes; None where neither writes its first key."""
    try:
        root = yaml.compose(file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    node, line = root, None
    for key in keys:
        child = _child(node, key)
        if child is None:
            break
        line, node = child
    if line is not None:
        return f"{file}:{line}"
    # The section is not in this file: it comes from the base that the file extends.
    base = _child(root, "extends")
    if base is None or not isinstance(base[1], yaml.ScalarNode):
        return None
    return _where_set(file.parent / base[1].value, keys)


def _child(node: yaml.Node | None, key: str) -> tuple[int, yaml.Node] | None:
    """The 1-based line and node of ``key`` in a mapping node (or an index in a list node)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return key_node.start_mark.line + 1, value_node
    if isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
        item = node.value[int(key)]
        return item.start_mark.line + 1, item
    return None


def defaults_as_yaml() -> str:
    """The default configuration as YAML, each field preceded by its description."""
    lines: list[str] = ["# forgetless configuration: every field with its default."]
    _describe(ForgetlessConfig(), lines, indent=0, path="")
    return "\n".join(lines) + "\n"


def _describe(section: BaseModel, lines: list[str], indent: int, path: str) -> None:
    pad = " " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        description = field.description or ""
        if name == "method" and path in METHOD_SECTIONS:
            description += f" Registered: {', '.join(registry.names(path))}."
        if description:
            lines.append(f"{pad}# {description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _describe(value, lines, indent + 2, f"{path}.{name}".lstrip("."))
        else:
            rendered = yaml.safe_dump({name: _dump(value)}, default_flow_style=True, width=10_000)
            lines.append(pad + rendered.strip()[1:-1])
