"""The method registry: every method registers once, by family and name.

A family is one step of the chain (``mix``, ``select``, ``train``, ``merge``) or a
continual-learning strategy (``continual``). An entry says what the method consumes and
produces, where its settings live in the configuration, and carries what the family's code
needs to run it (``implementation``: a class, a function, or a description such as a merge
rule). The configuration validates method names against it, and the CLI's choices, `forgetless
methods` and the documentation's tables are generated from it, so adding a method is one new
module that calls :func:`register` (imported before the configuration is validated).

Like PEFT's tuner mapping, the registry holds no method code itself and imports nothing of
forgetless above ``errors``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from forgetless.errors import ForgetlessError

FAMILIES: dict[str, str] = {
    "mix": "data mixtures over a clustered pool (CLIMB and simple baselines)",
    "select": "training-data selection from a pool",
    "train": "fine-tuning methods",
    "merge": "merging expert deltas into their base",
    "continual": "strategies for learning a task sequence",
}


@dataclass(frozen=True)
class Method:
    family: str
    name: str
    summary: str
    consumes: str
    produces: str
    # Dotted path of the config section that holds the method's own settings, if any.
    settings: str | None = None
    implementation: Any = field(default=None, compare=False, repr=False)


_METHODS: dict[str, dict[str, Method]] = {family: {} for family in FAMILIES}


def register(method: Method) -> Method:
    if method.family not in _METHODS:
        raise ValueError(f"unknown method family {method.family!r}; families: {list(FAMILIES)}")
    if method.name in _METHODS[method.family]:
        raise ValueError(f"{method.family} method {method.name!r} is registered twice")
    _METHODS[method.family][method.name] = method
    return method


def unregister(family: str, name: str) -> None:
    """Remove a method (for tests and for plugins that replace a built-in)."""
    _METHODS[family].pop(name, None)


def names(family: str) -> tuple[str, ...]:
    return tuple(_METHODS[family])


def lookup(family: str, name: str) -> Method:
    """The registered method, or a one-line error naming the choices."""
    found = _METHODS[family].get(name)
    if found is None:
        raise ForgetlessError(
            f"unknown {family} method {name!r}; choose one of: {', '.join(names(family))}"
        )
    return found


def methods(families: Iterable[str] = FAMILIES) -> list[Method]:
    return [method for family in families for method in _METHODS[family].values()]


def markdown_table(family: str) -> str:
    """The family's methods as a Markdown table (the docs embed these)."""
    lines = [
        "| method | what it does | consumes | produces | settings |",
        "|---|---|---|---|---|",
    ]
    for method in _METHODS[family].values():
        settings = f"`{method.settings}`" if method.settings else "–"
        lines.append(
            f"| `{method.name}` | {method.summary} | {method.consumes} | {method.produces} "
            f"| {settings} |"
        )
    return "\n".join(lines)
