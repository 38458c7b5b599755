"""Testing a selection cost: does it predict forgetting?

The criterion test (``scripts/ogs_criterion.py``, docs/select.md) trains on the lowest- and
the highest-cost part of a pool and on a random part, all matched on utility and tokens, and
regresses the measured anchor-loss change of random subsets of the same tokens on their
predicted cost. This module builds those subsets from the pool's gradient features and
computes what each subset is predicted to cost; it trains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.select.metrics import Anchor, cosine, orthogonality, unit_rows

ARMS = ("low", "high", "random")


def sample_criterion(gradients: np.ndarray, anchor: Anchor, cost: str) -> np.ndarray:
    """The per-sample cost the arms are ranked by, for ``select.cost``.

    ``energy`` is OGS's cost as it is (1 - orthogonality). ``conflict`` is its unclipped form,
    -cos(g_i, g_ref): the same order as the cost max(0, -cos) over the samples that conflict,
    but it also orders the samples the clip ties at zero, so the low arm is the most
    anchor-aligned part of the pool rather than an arbitrary draw among ties.
    """
    if cost == "energy":
        return 1.0 - orthogonality(gradients, anchor)
    if cost == "conflict":
        return -cosine(gradients, anchor.mean)
    raise ForgetlessError(f"unknown cost {cost!r}; choose energy or conflict")


def utility_strata(utility: np.ndarray, strata: int) -> np.ndarray:
    """Each sample's utility stratum: ``strata`` quantile bins of (nearly) equal size, 0 the
    lowest utility."""
    labels = np.empty(len(utility), dtype=np.int64)
    order = np.argsort(utility, kind="stable")
    for label, group in enumerate(np.array_split(order, max(1, min(strata, len(utility))))):
        labels[group] = label
    return labels


def fill(order: np.ndarray, tokens: np.ndarray, budget: float) -> np.ndarray:
    """The first samples of ``order`` up to the one whose tokens reach ``budget`` (all of
    them if they hold fewer)."""
    total = np.cumsum(tokens[order])
    return order[: int(np.searchsorted(total, budget)) + 1]


def matched_arms(
    criterion: np.ndarray,
    strata: np.ndarray,
    tokens: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The low-, high-cost and random arms, matched on utility and tokens.

    From every utility stratum (``strata``, as :func:`utility_strata` labels them) each arm
    takes ``fraction`` of the stratum's tokens: the lowest-criterion samples (low), the
    highest (high), or samples in a random order (random), up to the one that reaches the
    share. So the arms hold the same tokens, distributed alike over utility up to the width of
    a stratum, and a difference between them is the criterion's, not the utility's or the
    amount of training's. Record counts may differ: where the criterion goes with length, one
    arm needs more records for its tokens. Returns sorted indices into ``criterion``.
    """
    if not 0 < fraction <= 0.5:
        raise ForgetlessError(
            f"the arm fraction must be in (0, 0.5] so that the low and high arms do not "
            f"overlap; got {fraction:g}"
        )
    picks: dict[str, list[np.ndarray]] = {name: [] for name in ARMS}
    for label in np.unique(strata):
        group = np.flatnonzero(strata == label)
        budget = fraction * tokens[group].sum()
        # Shuffled first, so that ties in the criterion are broken at random, not by pool order.
        shuffled = rng.permutation(group)
        ranked = shuffled[np.argsort(criterion[shuffled], kind="stable")]
        low, high = fill(ranked, tokens, budget), fill(ranked[::-1], tokens, budget)
        if np.intersect1d(low, high).size:
            raise ForgetlessError(
                f"a utility stratum of {len(group)} samples cannot give disjoint low- and "
                "high-cost shares of its tokens: use fewer strata or a smaller fraction"
            )
        picks["low"].append(low)
        picks["high"].append(high)
        picks["random"].append(fill(rng.permutation(group), tokens, budget))
    return {name: np.sort(np.concatenate(parts)) for name, parts in picks.items()}


def random_subsets(
    tokens: np.ndarray, budget: float, subsets: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``subsets`` uniform random subsets holding ``budget`` tokens each (sorted indices into
    ``tokens``)."""
    return [np.sort(fill(rng.permutation(len(tokens)), tokens, budget)) for _ in range(subsets)]


@dataclass(frozen=True)
class Predictions:
    """What a subset is predicted to cost the anchor, three ways (higher = more forgetting)."""

    mean_cost: float  # the subset's mean per-sample criterion: what OGS's constraint bounds
    first_order: float  # -g_ref . mean gradient: first-order anchor-loss rise of a unit step
    subset_energy: float  # share of the subset's mean gradient in the anchor subspace


def predict(
    gradients: np.ndarray, anchor: Anchor, criterion: np.ndarray, indices: np.ndarray
) -> Predictions:
    """The predictions for the subset ``indices`` of the gradient rows.

    The mean cost treats samples one by one; the other two look at the subset's mean
    gradient, where samples that pull against each other cancel, as they do in training.
    """
    mean_gradient = np.asarray(gradients, dtype=np.float64)[indices].mean(0)
    inside = unit_rows(mean_gradient[None]) @ anchor.basis
    return Predictions(
        mean_cost=float(criterion[indices].mean()),
        first_order=float(-mean_gradient @ anchor.mean),
        subset_energy=float((inside**2).sum()),
    )


def fit_line(
    x: Sequence[float], y: Sequence[float], *, resamples: int = 2000, seed: int = 0
) -> dict[str, float | list[float] | int | None]:
    """Least-squares slope of y on x with its 95 % t-interval, Pearson r, and Spearman's rho
    with a 95 % percentile-bootstrap interval (points resampled). All but the count are None
    where the points give no line (fewer than three, or x or y constant)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    result: dict[str, float | list[float] | int | None] = {
        "points": len(x),
        "slope": None,
        "slope_ci95": None,
        "intercept": None,
        "pearson_r": None,
        "spearman": None,
        "spearman_ci95": None,
    }
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    line = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * line.stderr
    rho = stats.spearmanr(x, y).statistic
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    rhos = _row_correlations(stats.rankdata(x[draws], axis=1), stats.rankdata(y[draws], axis=1))
    # A resample with a constant column has no rank correlation; it is left out.
    rhos = rhos[np.isfinite(rhos)]
    result.update(
        slope=float(line.slope),
        slope_ci95=[float(line.slope - half), float(line.slope + half)],
        intercept=float(line.intercept),
        pearson_r=float(line.rvalue),
        spearman=None if not np.isfinite(rho) else float(rho),
        spearman_ci95=[float(v) for v in np.percentile(rhos, [2.5, 97.5])] if len(rhos) else None,
    )
    return result


def _row_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN where a row
    is constant)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    scale = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / scale
