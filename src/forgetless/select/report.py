"""Writing a selection: the chosen records (jsonl), a summary, and histograms.

``selected.jsonl`` holds one row per chosen record, best first: the record's own fields (so
``forgetless train --data selected.jsonl`` trains on it) plus ``rank`` and ``score``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.data.records import record_row
from forgetless.io import atomic_file, write_json_atomic, write_text_atomic
from forgetless.select.config import SelectConfig

HISTOGRAM_FILE = "histograms.png"
SELECTED_FILE = "selected.jsonl"


def write_selection(
    workdir: Path,
    select: SelectConfig,
    data,
    ranking: np.ndarray,
    ranked_scores: np.ndarray,
    scores,
    valid: np.ndarray | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    lines = []
    for rank, (index, score) in enumerate(
        zip(ranking.tolist(), ranked_scores.tolist(), strict=True)
    ):
        row = record_row(data.candidates[index])
        row.update(rank=rank, score=float(score))
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(workdir / SELECTED_FILE, "\n".join(lines) + "\n")
    summary: dict[str, Any] = {
        "method": select.method,
        "budget": select.budget,
        "budget_tokens": select.budget_tokens,
        "pool": len(data.candidates),
        "validation": len(data.validation),
        "selected": len(ranking),
        "records_file": SELECTED_FILE,
        **extra,
    }
    if scores is not None:
        summary["gradient_metrics"] = _compare(scores, valid, data.featured, ranking, workdir)
        summary["histograms"] = HISTOGRAM_FILE
    write_json_atomic(workdir / "summary.json", summary)
    return summary


def _compare(scores, valid, featured, ranking, workdir: Path) -> dict[str, Any]:
    """Orthogonality, conflict and utility of the selection vs the pool, over the samples
    that have gradient features (for ogs only the featured part of the pool)."""
    valid = np.asarray(valid)
    rows = np.flatnonzero(valid)
    position = {index: row for row, index in enumerate(featured)}
    picked = np.asarray(
        [position[i] for i in ranking.tolist() if i in position and valid[position[i]]], dtype=int
    )
    metrics = {
        "orthogonality": scores.orthogonality,
        "conflict": scores.conflict,
        "utility": scores.utility,
    }
    metrics = {name: values for name, values in metrics.items() if values is not None}
    result: dict[str, Any] = {
        "pool_with_gradients": int(len(rows)),
        "selected_with_gradients": int(len(picked)),
    }
    for name, values in metrics.items():
        result[name] = {
            "pool_mean": float(values[rows].mean()),
            "selected_mean": float(values[picked].mean()) if len(picked) else None,
        }
    _histograms(metrics, rows, picked, workdir / HISTOGRAM_FILE)
    return result


def _histograms(metrics: dict[str, np.ndarray], rows, picked, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for axis, (name, values) in zip(axes, metrics.items(), strict=True):
        bins = np.histogram_bin_edges(values[rows], bins=30)
        axis.hist(values[rows], bins=bins, alpha=0.5, density=True, label="pool")
        if len(picked):
            axis.hist(values[picked], bins=bins, alpha=0.6, density=True, label="selected")
        axis.set_title(name)
    axes[0].legend()
    figure.tight_layout()
    with atomic_file(path, "wb") as out:
        figure.savefig(out, dpi=100, format="png")
    plt.close(figure)
