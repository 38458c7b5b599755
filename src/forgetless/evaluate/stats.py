"""Uncertainty for evaluation metrics: standard errors and 95 % intervals.

Forgetting is measured as a difference of a few points between two scores, so every score
carries its uncertainty; without it a 1-point "regression" on 200 items cannot be told from
noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal
Z_95_ONE_SIDED = 1.6448536269514722


def proportion_stderr(successes: int, n: int) -> float | None:
    """Standard error of a proportion as lm-evaluation-harness reports it.

    lm-eval takes the sample standard deviation (n - 1 denominator) of the 0/1 scores over
    sqrt(n), i.e. sqrt(p (1 - p) / (n - 1)); we match it so the two tools' numbers line up.
    None where undefined (fewer than two items).
    """
    if n < 2:
        return None
    p = successes / n
    return math.sqrt(p * (1.0 - p) / (n - 1))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion.

    Unlike the normal approximation p ± z·se it never leaves [0, 1] and stays honest for
    small n or accuracies near 0 or 1 (both common on small held-out sets).
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # At p = 0 or 1 the bound is exactly 0 or 1; the formula gets there only up to rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return (low, high)


def bootstrap_ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators).

    Units (documents) are resampled whole, so the interval reflects variation between
    documents rather than pretending every token is independent.
    """
    numer = np.asarray(numerators, dtype=np.float64)
    denom = np.asarray(denominators, dtype=np.float64)
    if numer.shape != denom.shape or numer.ndim != 1:
        raise ValueError("numerators and denominators must be 1-D sequences of equal length")
    if numer.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # Resample in chunks so memory stays ~10 M indices however many units there are.
    chunk = max(1, 10_000_000 // numer.size)
    pieces = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, numer.size, size=(min(chunk, resamples - start), numer.size))
        totals = denom[picks].sum(axis=1)
        # A resample made only of empty units has no ratio; drop it, never divide by zero.
        valid = totals > 0
        pieces.append(numer[picks].sum(axis=1)[valid] / totals[valid])
    ratios = np.concatenate(pieces)
    if ratios.size == 0:
        return (float("nan"), float("nan"))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return (float(low), float(high))


def paired_accuracy_change(
    correct_before: Sequence[int], correct_after: Sequence[int], z: float = Z_95
) -> tuple[float, float, float]:
    """Accuracy after minus before on the same items, with its 95 % interval.

    Pairing removes the item-difficulty variance that dominates each model's own interval:
    on 2376 ARC-easy items each accuracy is ±2 points, while a paired change of one point
    can already be told from noise.
    """
    before = np.asarray(correct_before, dtype=np.float64)
    after = np.asarray(correct_after, dtype=np.float64)
    if before.shape != after.shape or before.size < 2:
        raise ValueError("need the same two or more items scored for both models")
    differences = after - before
    change = float(differences.mean())
    half_width = z * float(differences.std(ddof=1)) / math.sqrt(differences.size)
    return change, change - half_width, change + half_width


def paired_perplexity_ratio(
    nll_before: Sequence[float],
    nll_after: Sequence[float],
    tokens: Sequence[int],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Perplexity after / before on the same documents, with a 95 % bootstrap interval.

    Documents are resampled jointly for both models, so the interval reflects how
    consistently the change shows across documents, not how hard the documents are.
    """
    before = np.asarray(nll_before, dtype=np.float64)
    after = np.asarray(nll_after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError("need the same documents scored for both models")
    differences = after - before
    ratio = math.exp(differences.sum() / float(np.sum(tokens)))
    low, high = bootstrap_ratio_interval(differences, tokens, resamples=resamples, seed=seed)
    return ratio, math.exp(low), math.exp(high)


def read_evaluation(directory) -> tuple[dict, dict]:
    """``(metrics, items)`` of an evaluation stage's folder (metrics.json, items.json)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    metrics = json.loads((directory / "metrics.json").read_text())
    items = json.loads((directory / "items.json").read_text())
    return metrics, items


def paired_task_change(task: str, base: tuple[dict, dict], other: tuple[dict, dict]) -> dict:
    """Change of ``other`` against ``base`` on one task, both ``(metrics, items)``: the value,
    its 95 % interval and the unit (% perplexity, or accuracy points)."""
    metric = base[0][task]["metric"]
    before, after = base[1][task], other[1][task]
    if metric == "perplexity":
        if before["document_tokens"] != after["document_tokens"]:
            raise ValueError(f"{task}: the two models were scored on different documents")
        ratio, low, high = paired_perplexity_ratio(
            before["document_nll"], after["document_nll"], before["document_tokens"]
        )
        return {
            "unit": "% perplexity",
            "change": 100 * (ratio - 1),
            "ci95": [100 * (low - 1), 100 * (high - 1)],
        }
    change, low, high = paired_accuracy_change(before["correct"], after["correct"])
    return {"unit": "points", "change": 100 * change, "ci95": [100 * low, 100 * high]}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho, or None where it is undefined: fewer than three values, or a side that
    is constant (e.g. a clipped cost zero everywhere) and so ranks nothing."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def significant_rank_correlation(n: int) -> float:
    """The Spearman's rho above which a positive correlation of ``n`` pairs is significant at
    5 % (one-sided; the large-sample test, rho's sd 1/sqrt(n - 1) under independence)."""
    return Z_95_ONE_SIDED / math.sqrt(max(n - 1, 1))


def format_correlation(value: float | None) -> str:
    """A rank correlation for a report: signed, two decimals, or why there is none."""
    return "undefined (constant)" if value is None else f"{value:+.2f}"
