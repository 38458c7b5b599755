"""Anchor geometry and the per-sample quantities every selection method ranks by.

All quantities use the projected gradients; random projection preserves inner products up
to a small relative error, which is what makes the d-dimensional features usable here.

* orthogonality o_i = 1 - |P_A g_i|^2 / |g_i|^2, with P_A the projector onto the anchor
  subspace (top right singular vectors of the anchor gradients);
* conflict c_i = max(0, -cos(g_i, g_ref)), with g_ref the mean anchor gradient (and the
  paper's |cos(g_i, g_ref)| and the norm-aware max(0, -<g_i, g_ref>/|g_ref|) beside it);
* utility u_i = cos(g_i, g_V), with g_V the mean unit validation gradient (as in LESS).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from forgetless.errors import ForgetlessError

EPS = 1e-12
logger = logging.getLogger(__name__)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), EPS)


@dataclass(frozen=True)
class Anchor:
    mean: np.ndarray  # g_ref, (d,)
    basis: np.ndarray  # (d, r) orthonormal columns
    captured: float  # share of the anchor gradients' energy inside the subspace


def anchor_from_gradients(vectors: np.ndarray, rank: int) -> Anchor:
    """g_ref and the rank-r anchor subspace of a set of anchor gradients (rows)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) == 0:
        raise ForgetlessError(
            "no usable anchor gradients: the anchor data is empty or every sample's prompt "
            "fills select.gradient.max_length"
        )
    # Unit rows so that a few anchor samples with huge gradients do not define the subspace.
    units = unit_rows(vectors)
    _, singular, right = np.linalg.svd(units, full_matrices=False)
    rank = min(rank, len(singular))
    energy = singular**2
    return Anchor(
        mean=vectors.mean(0),
        basis=right[:rank].T.copy(),
        captured=float(energy[:rank].sum() / max(energy.sum(), EPS)),
    )


def domain_direction(vectors: np.ndarray) -> np.ndarray:
    """g_V: the mean unit gradient of the domain validation samples."""
    if len(vectors) == 0:
        raise ForgetlessError(
            "no usable validation gradients: the validation data is empty or every sample's "
            "prompt fills select.gradient.max_length"
        )
    return unit_rows(vectors).mean(0)


def orthogonality(vectors: np.ndarray, anchor: Anchor) -> np.ndarray:
    inside = unit_rows(vectors) @ anchor.basis
    return 1.0 - (inside**2).sum(1)


def cosine(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    direction = np.asarray(direction, dtype=np.float64)
    return unit_rows(vectors) @ (direction / max(np.linalg.norm(direction), EPS))


def conflict(vectors: np.ndarray, anchor: Anchor) -> np.ndarray:
    return np.maximum(0.0, -cosine(vectors, anchor.mean))


COSTS = ("energy", "conflict", "abs_cosine", "norm_conflict")


@dataclass(frozen=True)
class SampleScores:
    utility: np.ndarray
    orthogonality: np.ndarray | None  # None for exact products: no anchor subspace
    alignment: np.ndarray  # cos(g_i, g_ref), signed
    anchor_component: np.ndarray  # <g_i, g_ref / |g_ref|>: the length of g_i along g_ref

    @property
    def conflict(self) -> np.ndarray:
        return np.maximum(0.0, -self.alignment)

    def cost(self, kind: str) -> np.ndarray:
        """The per-sample cost a selection bounds (see ``select.cost``)."""
        if kind == "energy":
            if self.orthogonality is None:
                raise ForgetlessError(
                    "exact gradient products have no anchor subspace, so no energy cost"
                )
            return 1.0 - self.orthogonality
        if kind == "conflict":
            return self.conflict
        if kind == "abs_cosine":
            # The paper's orthogonality score is 1 - |cos(g_i, g_anchor)|.
            return np.abs(self.alignment)
        if kind == "norm_conflict":
            # First-order anchor-loss increase of a unit-rate step on the sample: a long
            # gradient pointing against the anchor costs more than a short one.
            return np.maximum(0.0, -self.anchor_component)
        raise ForgetlessError(f"unknown cost {kind!r}; choose one of {', '.join(COSTS)}")


def score_samples(vectors: np.ndarray, anchor: Anchor, target: np.ndarray) -> SampleScores:
    vectors = np.asarray(vectors, dtype=np.float64)
    reference = anchor.mean / max(np.linalg.norm(anchor.mean), EPS)
    return SampleScores(
        utility=cosine(vectors, target),
        orthogonality=orthogonality(vectors, anchor),
        alignment=cosine(vectors, anchor.mean),
        anchor_component=vectors @ reference,
    )


def constrained_top_k(
    utility: np.ndarray, cost: np.ndarray, k: int, cost_limit: float
) -> tuple[np.ndarray, float, bool]:
    """The k samples maximising utility - lam * cost, with the smallest lam >= 0 whose
    selection has mean cost <= cost_limit (bisection on the Lagrange multiplier).

    Returns the chosen indices (best first), lam, and whether the limit is met. When no
    selection of k meets it (even the k least costly samples cost more on average), the
    least costly selection is returned at the largest lam tried: the ranking is then the
    cost's alone, and the caller says so.
    """
    k = max(1, min(k, len(utility)))

    def pick(lam: float) -> np.ndarray:
        # A stable sort on the negated score: equal scores keep pool order, run after run.
        return np.argsort(-(utility - lam * cost), kind="stable")[:k]

    chosen = pick(0.0)
    if cost[chosen].mean() <= cost_limit:
        return chosen, 0.0, True
    low, high = 0.0, 1.0
    while cost[pick(high)].mean() > cost_limit and high < 1e6:
        low, high = high, high * 4
    for _ in range(50):
        middle = (low + high) / 2
        if cost[pick(middle)].mean() > cost_limit:
            low = middle
        else:
            high = middle
    chosen = pick(high)
    return chosen, high, bool(cost[chosen].mean() <= cost_limit)


@dataclass(frozen=True)
class ExactChoice:
    """The exact constrained choice's multiplier and limit, which OGS and its analyses
    rank by (the exact score u - multiplier * c)."""

    multiplier: float
    limit: float
    limit_met: bool


COST_LIMIT_BASES = ("feasible", "pool_mean")


def allowed_cost(
    utility: np.ndarray, cost: np.ndarray, k: int, cost_limit: float, basis: str
) -> float:
    """The mean cost a selection of k may have (see ``select.cost_limit_basis``).

    ``feasible``: ``cost_limit`` of the way from the k least costly samples' mean cost to
    that of the k most useful ones (the unconstrained, LESS-like choice), so the limit can
    always be met and always binds below 1. ``pool_mean``: ``cost_limit`` times the pool's
    mean cost, which a pool whose costs lie in a narrow band cannot meet.
    """
    if basis == "pool_mean":
        return cost_limit * float(cost.mean())
    if basis != "feasible":
        raise ForgetlessError(
            f"unknown cost limit basis {basis!r}; choose one of {', '.join(COST_LIMIT_BASES)}"
        )
    k = max(1, min(k, len(cost)))
    least = float(np.sort(cost)[:k].mean())
    free = float(cost[np.argsort(-utility, kind="stable")[:k]].mean())
    return least + cost_limit * max(free - least, 0.0)


def exact_choice(
    utility: np.ndarray, cost: np.ndarray, budget: float, cost_limit: float, basis: str
) -> ExactChoice:
    """The exact constrained choice of a ``budget`` share of the samples."""
    k = math.ceil(budget * len(utility))
    limit = allowed_cost(utility, cost, k, cost_limit, basis)
    _, lam, met = constrained_top_k(utility, cost, k, limit)
    if not met:
        warn_limit_unmet(cost, k, limit)
    return ExactChoice(lam, limit, met)


def warn_limit_unmet(cost: np.ndarray, k: int, limit: float) -> None:
    # Not an error: the least costly selection is still a defined, useful choice, but it
    # ignores the utility, which the user must know.
    least = float(np.sort(cost)[: max(1, min(k, len(cost)))].mean())
    logger.warning(
        "select.cost_limit cannot be met: the %d least costly samples have mean cost %.4g, "
        "above the limit %.4g, so the selection ranks by cost alone; raise "
        "select.cost_limit or select.budget, or set select.cost_limit_basis=feasible, for a "
        "choice that weighs utility",
        k,
        least,
        limit,
    )
