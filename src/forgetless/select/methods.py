"""The selection methods: how each ranks the pool, and which features it needs.

A method is a :class:`SelectionMethod` registered under the ``select`` family; the selection
stage gives it the scores it asked for, and keeps the head of its ranking that the budget
allows (a share of the pool's records, or of its training tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetless.registry import Method, register


@dataclass
class RankingInputs:
    """What a method ranks with; gradient fields are None for methods without gradients."""

    count: int  # candidates in the pool
    k: int  # how many the budget is expected to keep (fixes orthogonal's multiplier)
    seed: int
    utility: np.ndarray | None = None  # per candidate with gradient features
    cost: np.ndarray | None = None
    valid: np.ndarray | None = None  # candidates whose gradient is usable
    cost_limit: float | None = None
    navigator_logits: Callable[[], np.ndarray] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the method reports back


Ranker = Callable[[RankingInputs], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SelectionMethod:
    rank: Ranker  # -> (every candidate it would keep, best first; their scores)
    gradients: bool  # needs per-sample gradient features (and the anchor and validation)
    navigator: bool  # scores the whole pool with the Navigator trained on a featured part
    budgeted: bool = True  # False: the ranking is the selection, whatever the budget


def _all(inputs: RankingInputs) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(inputs.count), np.zeros(inputs.count)


def _random(inputs: RankingInputs) -> tuple[np.ndarray, np.ndarray]:
    ranking = np.random.default_rng(inputs.seed).permutation(inputs.count)
    return ranking, np.zeros(len(ranking))


def _less(inputs: RankingInputs) -> tuple[np.ndarray, np.ndarray]:
    # Samples with nothing to learn have no gradient and are never chosen.
    usable = np.flatnonzero(inputs.valid)
    ranking = usable[np.argsort(-inputs.utility[usable], kind="stable")]
    return ranking, inputs.utility[ranking]


def _orthogonal(inputs: RankingInputs) -> tuple[np.ndarray, np.ndarray]:
    from forgetless.select.metrics import constrained_top_k, warn_limit_unmet

    usable = np.flatnonzero(inputs.valid)
    utility, cost = inputs.utility[usable], inputs.cost[usable]
    _, lam, met = constrained_top_k(utility, cost, inputs.k, inputs.cost_limit)
    if not met:
        warn_limit_unmet(cost, inputs.k, inputs.cost_limit)
    inputs.extra["lagrange_multiplier"] = lam
    inputs.extra["cost_limit_met"] = met
    # The constrained choice of k is the head of this order; a token budget may keep more
    # or fewer.
    ranking = usable[np.argsort(-(utility - lam * cost), kind="stable")]
    return ranking, inputs.utility[ranking] - lam * inputs.cost[ranking]


def _navigator(inputs: RankingInputs) -> tuple[np.ndarray, np.ndarray]:
    logits = inputs.navigator_logits()
    ranking = np.argsort(-logits, kind="stable")
    return ranking, logits[ranking]


def _register(name: str, summary: str, method: SelectionMethod, settings: str | None) -> None:
    register(
        Method(
            "select",
            name,
            summary,
            consumes="pool (records)",
            produces="records (the selection)",
            settings=settings,
            implementation=method,
        )
    )


_register(
    "all",
    "every candidate in pool order, whatever the budget: the no-selection baseline trained on "
    "exactly the pool the other methods choose from",
    SelectionMethod(_all, gradients=False, navigator=False, budgeted=False),
    None,
)
_register(
    "random",
    "a seeded random subset of the budget's size",
    SelectionMethod(_random, gradients=False, navigator=False),
    None,
)
_register(
    "less",
    "top cosine between each sample's gradient and the domain validation gradient (LESS)",
    SelectionMethod(_less, gradients=True, navigator=False),
    "select.gradient",
)
_register(
    "orthogonal",
    "LESS's utility under a cap on the mean anchor cost, solved exactly on every pool "
    "sample's gradient",
    SelectionMethod(_orthogonal, gradients=True, navigator=False),
    "select.gradient",
)
_register(
    "ogs",
    "Orthogonal Gradient Selection: a Navigator trained by constrained RL on a "
    "gradient-featured part of the pool scores the whole pool without gradients",
    SelectionMethod(_navigator, gradients=True, navigator=True),
    "select.navigator",
)
