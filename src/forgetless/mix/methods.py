"""The mixtures a recipe can train on: each turns the clustered pool into weights per
super-cluster, from which the sampler draws the training set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetless.registry import Method, register

# (the search's outcome or None, tokens per super-cluster) -> weights summing to 1
WeightRule = Callable[[dict[str, Any] | None, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class MixtureMethod:
    weights: WeightRule
    needs_search: bool


def _register(name: str, summary: str, method: MixtureMethod, settings: str | None) -> None:
    register(
        Method(
            "mix",
            name,
            summary,
            consumes="text pool (mix.sources), clustered",
            produces="records (a training set of mix.tokens tokens)",
            settings=settings,
            implementation=method,
        )
    )


_register(
    "climb",
    "weights searched with proxy models and a LightGBM predictor (CLIMB)",
    MixtureMethod(lambda search, tokens: np.asarray(search["final"]["weights"]), True),
    "mix.search",
)
_register(
    "uniform",
    "equal weight per super-cluster",
    MixtureMethod(lambda search, tokens: np.full(len(tokens), 1.0 / len(tokens)), False),
    None,
)
_register(
    "natural",
    "each super-cluster's share of the pool's tokens (the pool as it is, minus pruning)",
    MixtureMethod(lambda search, tokens: tokens / tokens.sum(), False),
    None,
)
