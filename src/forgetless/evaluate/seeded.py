"""Arms trained with several seeds: their change against the base and their differences.

One training seed is one draw of the training noise, and a handful of evaluation items is one
draw of the items; a difference between two arms has to be told from both. The intervals here
come from one bootstrap that resamples the items (the same items for every model, so every
comparison is paired) and, independently for each arm, its seeds. With three seeds the seed
part is rough: a bootstrap over three values understates their spread, so the per-seed values
are reported beside every interval.

Changes are in the units a mean over items adds up in: the change of the mean token loss in
nats (the log of the perplexity ratio) for perplexity tasks, accuracy points otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LOSS_UNIT, ACCURACY_UNIT = "nats/token", "points"


@dataclass(frozen=True)
class TaskItems:
    """One task's per-item scores of the base and of several models, on the same items."""

    unit: str
    base: np.ndarray  # per-document NLL sums (perplexity), or 0/1 correctness
    models: dict[str, np.ndarray]  # by label, aligned with base
    tokens: np.ndarray | None  # per-document tokens (perplexity only)

    @classmethod
    def read(cls, task: str, base: tuple[dict, dict], evaluations: dict[str, tuple[dict, dict]]):
        """From ``(metrics, items)`` pairs as ``forgetless.evaluate.stats.read_evaluation``
        gives them: the base's and each labelled model's."""
        if base[0][task]["metric"] == "perplexity":
            tokens = base[1][task]["document_tokens"]
            for label, (_, items) in evaluations.items():
                if items[task]["document_tokens"] != tokens:
                    raise ValueError(f"{task}: {label} was scored on other documents")
            models = {
                label: np.asarray(items[task]["document_nll"], dtype=np.float64)
                for label, (_, items) in evaluations.items()
            }
            base_scores = np.asarray(base[1][task]["document_nll"], dtype=np.float64)
            return cls(LOSS_UNIT, base_scores, models, np.asarray(tokens, dtype=np.float64))
        models = {
            label: np.asarray(items[task]["correct"], dtype=np.float64)
            for label, (_, items) in evaluations.items()
        }
        return cls(
            ACCURACY_UNIT, np.asarray(base[1][task]["correct"], dtype=np.float64), models, None
        )

    def changes(self, picks: np.ndarray) -> dict[str, np.ndarray]:
        """Each model's change against the base on the items of every row of ``picks``
        (item indices, one row per resample)."""
        if self.tokens is not None:
            tokens = self.tokens[picks].sum(1)
            return {
                label: (scores - self.base)[picks].sum(1) / tokens
                for label, scores in self.models.items()
            }
        return {
            label: 100.0 * (scores - self.base)[picks].mean(1)
            for label, scores in self.models.items()
        }

    def change(self, label: str) -> float:
        """One model's change on all the items."""
        return float(self.changes(np.arange(len(self.base))[None])[label][0])


def seeded_changes(
    items: TaskItems,
    arms: dict[str, Sequence[str]],
    contrasts: Sequence[tuple[str, str]],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Each arm's change against the base (its models' labels, one per seed): the per-seed
    values, their mean and sd, and a 95 % interval of the mean; each contrast ``(a, b)``: the
    difference of the two arms' means with its 95 % interval (percentile bootstrap over the
    items, paired, and each arm's seeds)."""
    rng = np.random.default_rng(seed)
    count = len(items.base)
    picks = rng.integers(0, count, size=(resamples, count))
    resampled = items.changes(picks)
    point = items.changes(np.arange(count)[None])
    draws: dict[str, np.ndarray] = {}
    result: dict = {"unit": items.unit, "arms": {}, "contrasts": {}}
    for name, labels in arms.items():
        stacked = np.stack([resampled[label] for label in labels])  # (seeds, resamples)
        chosen = rng.integers(0, len(labels), size=(resamples, len(labels)))
        draws[name] = stacked[chosen.T, np.arange(resamples)].mean(0)
        per_seed = [float(point[label][0]) for label in labels]
        result["arms"][name] = {
            "per_seed": per_seed,
            "mean": float(np.mean(per_seed)),
            "sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
            "ci95": _interval(draws[name]),
        }
    for first, second in contrasts:
        means = result["arms"]
        result["contrasts"][f"{first}-{second}"] = {
            "difference": means[first]["mean"] - means[second]["mean"],
            "ci95": _interval(draws[first] - draws[second]),
        }
    return result


def pooled_changes(
    tasks: Sequence[str],
    base: tuple[dict, dict],
    evaluations: dict[str, tuple[dict, dict]],
    arms: dict[str, Sequence[str]],
    contrasts: Sequence[tuple[str, str]],
) -> dict:
    """``seeded_changes`` on every task, with the contrasts it was asked for:
    ``{"contrasts": [[a, b], ...], "tasks": {task: ...}}``."""
    return {
        "contrasts": [list(pair) for pair in contrasts],
        "tasks": {
            task: seeded_changes(TaskItems.read(task, base, evaluations), arms, contrasts)
            for task in tasks
        },
    }


def arm_cells(pooled: dict, name: str, tasks: Sequence[str]) -> list[str]:
    """One arm's row of a ``pooled_changes`` table: mean ± sd [interval] per task."""
    by_task = pooled["tasks"]
    return [format_change(by_task[t]["arms"][name], by_task[t]["unit"], spread=True) for t in tasks]


def contrast_cells(pooled: dict, first: str, second: str, tasks: Sequence[str]) -> list[str]:
    """One contrast's row of a ``pooled_changes`` table: difference [interval] per task."""
    by_task = pooled["tasks"]
    key = f"{first}-{second}"
    return [format_change(by_task[t]["contrasts"][key], by_task[t]["unit"]) for t in tasks]


def perplexity_percent(loss_change: float) -> float:
    """A change of the mean token loss (nats) as the % change of perplexity."""
    return 100.0 * (math.exp(loss_change) - 1.0)


def shown(value: float, unit: str) -> float:
    """A change as reports show it: perplexity tasks in % perplexity, accuracy in points."""
    return perplexity_percent(value) if unit == LOSS_UNIT else value


def format_change(entry: dict, unit: str, *, spread: bool = False) -> str:
    """An arm's mean change or a contrast's difference, as ``seeded_changes`` gives them, with
    its 95 % interval, e.g. ``+4.2 [+1.0, +7.5]``; with ``spread``, an arm's sd over its seeds
    after the mean (``+4.2 ± 1.3 [...]``), where it has more than one seed."""
    value = entry["mean"] if "mean" in entry else entry["difference"]
    low, high = entry["ci95"]
    text = f"{shown(value, unit):+.1f}"
    if spread and len(entry.get("per_seed", ())) > 1:
        text += f" ± {np.std([shown(v, unit) for v in entry['per_seed']], ddof=1):.1f}"
    return f"{text} [{shown(low, unit):+.1f}, {shown(high, unit):+.1f}]"


def _interval(draws: np.ndarray) -> list[float]:
    return [float(value) for value in np.percentile(draws, [2.5, 97.5])]
