"""The continual-learning report: the accuracy matrix, its metrics, and retention.

``R[i][j]`` is the accuracy on task ``j`` after training on tasks ``0..i`` of the sequence
(every task is evaluated after every stage, including tasks not trained yet), and ``b[j]``
is the base model's accuracy on task ``j``. With ``T`` tasks:

* average accuracy = mean of the last row, ``mean_j R[T-1][j]``;
* backward transfer (Lopez-Paz & Ranzato, 2017) = ``mean_{i<T-1} (R[T-1][i] - R[i][i])``;
  negative means later tasks made earlier ones worse;
* forward transfer = ``mean_{i>0} (R[i-1][i] - b[i])``: how much the tasks before ``i`` help
  task ``i`` before it is trained, measured against the *base model* (not against a model
  trained on task ``i`` alone);
* forgetting (Chaudhry et al., 2018) = ``mean_{i<T-1} (max_{l<T-1} R[l][i] - R[T-1][i])``:
  the drop of each earlier task from its best accuracy at any earlier stage to the end.

BWT, FWT and forgetting need at least two tasks learnt one after another; a single row (one
task, or multitask training on all tasks at once) reports them as None.

Outputs: ``continual.json`` (everything), ``continual.md`` (tables) and ``continual.png``
(the matrix as a heat-map).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.evaluate.stats import Z_95

Matrix = Sequence[Sequence[float]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _square(matrix: Matrix) -> int:
    size = len(matrix)
    if size == 0 or any(len(row) != size for row in matrix):
        raise ValueError("the accuracy matrix must be T x T with T >= 1")
    return size


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last stage."""
    if not matrix or not matrix[-1]:
        raise ValueError("the accuracy matrix is empty")
    return _mean(matrix[-1])


def backward_transfer(matrix: Matrix) -> float | None:
    size = _square(matrix)
    if size < 2:
        return None
    return _mean([matrix[-1][i] - matrix[i][i] for i in range(size - 1)])


def forward_transfer(matrix: Matrix, base: Sequence[float]) -> float | None:
    size = _square(matrix)
    if len(base) != size:
        raise ValueError(f"the base row has {len(base)} entries for {size} tasks")
    if size < 2:
        return None
    return _mean([matrix[i - 1][i] - base[i] for i in range(1, size)])


def forgetting(matrix: Matrix) -> float | None:
    size = _square(matrix)
    if size < 2:
        return None
    return _mean(
        [
            max(matrix[stage][i] for stage in range(size - 1)) - matrix[-1][i]
            for i in range(size - 1)
        ]
    )


def continual_metrics(matrix: Matrix, base: Sequence[float]) -> dict[str, float | None]:
    """All four metrics; a single row (multitask) has only the average accuracy."""
    if len(matrix) == 1:
        if len(matrix[0]) != len(base):
            raise ValueError(f"the base row has {len(base)} entries for {len(matrix[0])} tasks")
        transfer: dict[str, float | None] = {"bwt": None, "fwt": None, "forgetting": None}
    else:
        transfer = {
            "bwt": backward_transfer(matrix),
            "fwt": forward_transfer(matrix, base),
            "forgetting": forgetting(matrix),
        }
    return {"average_accuracy": average_accuracy(matrix), **transfer}


def paired_average_accuracy(
    correct_a: Mapping[str, Sequence[int]], correct_b: Mapping[str, Sequence[int]]
) -> tuple[float, float]:
    """Average accuracy of model a minus model b, both scored on the same items of every
    task, and the variance of that difference over the items.

    The average accuracy is the mean over tasks, so the difference is the mean of the tasks'
    paired differences; the tasks' items are independent samples, so their variances add
    (each the paired variance of its items over their count).
    """
    if set(correct_a) != set(correct_b):
        raise ValueError("the two models were scored on different tasks")
    means, variances = [], []
    for task, hits_a in correct_a.items():
        a = np.asarray(hits_a, dtype=np.float64)
        b = np.asarray(correct_b[task], dtype=np.float64)
        if a.shape != b.shape or a.size < 2:
            raise ValueError(f"{task}: need the same two or more items scored for both models")
        differences = a - b
        means.append(float(differences.mean()))
        variances.append(float(differences.var(ddof=1)) / differences.size)
    count = len(means)
    return sum(means) / count, sum(variances) / count**2


def pooled_paired_difference(
    groups: Sequence[Sequence[tuple[Mapping[str, Sequence[int]], Mapping[str, Sequence[int]]]]],
    z: float = Z_95,
) -> tuple[float, float, float]:
    """Mean over runs of model a's average accuracy minus model b's, and its 95 % interval
    over the items.

    Each group holds the ``(correct_a, correct_b)`` pairs of runs scored on the same items
    (the task orders of one seed split): their item-level differences are summed before the
    variance is taken, since every run of the group shares the items' sampling noise; adding
    the runs' variances as if independent would narrow the interval by up to the square root
    of the group's size. Groups are independent item samples, so their variances add.
    """
    runs = sum(len(group) for group in groups)
    total = variance = 0.0
    for group in groups:
        summed = [
            {
                task: np.sum([np.asarray(pair[side][task]) for pair in group], axis=0)
                for task in group[0][side]
            }
            for side in (0, 1)
        ]
        difference, group_variance = paired_average_accuracy(*summed)
        total += difference
        variance += group_variance
    mean = total / runs
    half_width = z * math.sqrt(variance) / runs
    return mean, mean - half_width, mean + half_width


def short_name(task: str) -> str:
    """``fewshot_dbpedia`` -> ``dbpedia``: the benchmark prefix repeats in every column."""
    return task.split("_", 1)[1] if task.startswith(("fewshot_", "olora_")) else task


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f} pt"


def _row_labels(report: dict[str, Any]) -> list[str]:
    if report["method"] == "multitask":
        return ["multitask (all tasks)"]
    return [f"{i + 1}. {short_name(task)}" for i, task in enumerate(report["tasks"])]


def _is_rate(metric: str) -> bool:
    return metric in ("accuracy", "exact_match")


def _value(value: float, metric: str) -> str:
    return f"{100 * value:.2f} %" if _is_rate(metric) else f"{value:.3f}"


def _retention_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| group | task | metric | base | final | Δ | better by |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric = row["metric"]
        delta = f"{100 * row['delta']:+.2f} pt" if _is_rate(metric) else f"{row['delta']:+.3f}"
        lines.append(
            f"| {row['group']} | {row['task']} | {metric} | {_value(row['before'], metric)} "
            f"| {_value(row['after'], metric)} | {delta} | {row['improvement_pct']:+.1f} % |"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    subset = f", subset {report['subset']}" if report.get("subset") else ""
    evaluated = report["evaluation"]
    limit = f", at most {evaluated['limit']} items per task" if evaluated.get("limit") else ""
    head = ""
    if report.get("head") == "closed_form":
        head = (
            " Class-incremental: a closed-form head over every class seen so far (the base "
            "row is the base model's label log-likelihood scoring)."
        )
    lines = [
        f"# Continual learning: {report['benchmark']} order {report['order']}, {report['method']}",
        "",
        f"model: `{report['model']}`{subset}; accuracy (%) on the {evaluated['split']} "
        f"split{limit}. Row = after training on that task, column = task evaluated.{head}",
        "",
        "| after \\ on | " + " | ".join(short_name(task) for task in report["tasks"]) + " |",
        "|---|" + "---|" * len(report["tasks"]),
        "| base model | " + " | ".join(_pct(value) for value in report["base"]) + " |",
    ]
    for label, row in zip(_row_labels(report), report["matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(_pct(value) for value in row) + " |")
    metrics = report["metrics"]
    lines += [
        "",
        "| metric | value |",
        "|---|---|",
        f"| average accuracy | {_pct(metrics['average_accuracy'])} % |",
        f"| backward transfer (BWT) | {_points(metrics['bwt'])} |",
        f"| forward transfer (FWT, vs the base model) | {_points(metrics['fwt'])} |",
        f"| forgetting | {_points(metrics['forgetting'])} |",
        "",
    ]
    timings = report["timings"]
    lines.append(
        f"- compute: {timings['train_seconds']:.0f} s training, "
        f"{timings['eval_seconds']:.0f} s evaluation"
    )
    if report["retention"]:
        lines += ["", "## Retention of general abilities (base model → final model)", ""]
        lines += _retention_lines(report["retention"])
        change = report["retention_change_pct"]
        lines += ["", f"- mean change of the retention tasks (positive = better): {change:+.1f} %"]
    return "\n".join(lines) + "\n"


def plot_matrix(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = [report["base"], *report["matrix"]]
    labels = ["base model", *_row_labels(report)]
    columns = [short_name(task) for task in report["tasks"]]
    figure, axis = plt.subplots(
        figsize=(1.0 * len(columns) + 2.5, 0.5 * len(rows) + 1.8), layout="constrained"
    )
    image = axis.imshow(rows, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            # Dark text on the bright end of viridis, light text on the dark end.
            colour = "black" if value > 0.6 else "white"
            axis.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color=colour)
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("evaluated on")
    axis.set_ylabel("after training on")
    axis.set_title(f"{report['benchmark']} order {report['order']}, {report['method']}")
    figure.colorbar(image, ax=axis, label="accuracy")
    from forgetless.io import atomic_file

    with atomic_file(path, "wb") as out:
        figure.savefig(out, dpi=120, format="png")
    plt.close(figure)


def write_continual_report(report: dict[str, Any], directory: str | Path) -> None:
    from forgetless.io import write_json_atomic, write_text_atomic

    directory = Path(directory)
    write_json_atomic(directory / "continual.json", report)
    write_text_atomic(directory / "continual.md", render_markdown(report))
    plot_matrix(report, directory / "continual.png")
