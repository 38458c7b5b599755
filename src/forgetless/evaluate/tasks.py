"""Named evaluation tasks: a data source plus the metric that fits its kind.

A task name is ``[ppl:]<source>[@<split>]`` where ``source`` is a registered data set or a
user file, or the name of a user task (``evaluate.tasks``: a file with a column mapping):

* a data set with multiple-choice items (``arc_easy``, ``piqa``, ``pubmedqa`` ...) ->
  log-likelihood accuracy, raw and length-normalised;
* a text-only data set (``c4``) or any source prefixed with ``ppl:`` -> perplexity of its
  text (``ppl:pubmedqa`` is the perplexity of PubMedQA abstracts);
* ``gsm8k`` -> exact match of the final number after greedy generation;
* a user task -> accuracy of its multiple-choice items, or perplexity of its text.

Evaluation defaults to the ``test`` split where a data set has one, so a model is never
scored on the data it was trained on by accident.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forgetless.data import get_dataset_spec, load_records
from forgetless.data.records import InstructionRecord, MultipleChoiceRecord, TextRecord
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig, UserTaskConfig
from forgetless.evaluate.generation import gsm8k_exact_match
from forgetless.evaluate.multiple_choice import score_multiple_choice
from forgetless.evaluate.perplexity import perplexity

PERPLEXITY_PREFIX = "ppl:"
GENERATION_TASKS = ("gsm8k",)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    kind: str  # multiple_choice | perplexity | generation
    split: str | None
    columns: dict[str, str] | None = field(default=None, compare=False, hash=False)

    @property
    def metric(self) -> str:
        return {"multiple_choice": "accuracy", "perplexity": "perplexity"}.get(
            self.kind, "exact_match"
        )

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "perplexity"


def parse_task(name: str, user_tasks: dict[str, UserTaskConfig] | None = None) -> TaskSpec:
    user = (user_tasks or {}).get(name)
    if user is not None:
        kind = "multiple_choice" if user.metric == "accuracy" else "perplexity"
        return TaskSpec(name, user.source, kind, user.split, user.columns)
    body = name.strip()
    wants_ppl = body.startswith(PERPLEXITY_PREFIX)
    if wants_ppl:
        body = body[len(PERPLEXITY_PREFIX) :]
    source, _, split = body.partition("@")
    if not source:
        raise ForgetlessError(f"task {name!r} names no data source")
    registered = _registered(source)
    if wants_ppl:
        kind = "perplexity"
    elif source in GENERATION_TASKS:
        kind = "generation"
    elif registered is None:
        raise ForgetlessError(
            f"task {name!r} is no data set or user task: write 'ppl:{source}' for the "
            "perplexity of a file, or define it under evaluate.tasks (e.g. a multiple-choice "
            "file with its column mapping)"
        )
    elif "multiple_choice" in registered.kinds:
        kind = "multiple_choice"
    elif "text" in registered.kinds:
        kind = "perplexity"
    else:
        raise ForgetlessError(f"task {name!r}: no metric for data set {source!r}")
    if registered is not None and not split:
        split = "test" if "test" in registered.splits else registered.default_split
    return TaskSpec(name=name, source=source, kind=kind, split=split or None)


def _registered(source: str):
    try:
        return get_dataset_spec(source)
    except ForgetlessError:
        return None


@dataclass
class TaskResult:
    task: str
    kind: str
    metric: str
    value: float
    higher_is_better: bool
    ci95: tuple[float, float] | None
    n: int
    seconds: float
    details: dict[str, Any]
    # Per item, in input order: what a paired comparison of two models on the same items
    # needs (0/1 correctness, or each document's summed NLL and token count). Kept out of
    # ``to_dict`` so that metrics files stay small; ``EvaluateStage`` writes it separately.
    per_item: dict[str, list] = field(default_factory=dict, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TaskResult:
        """The inverse of ``asdict``: a result read back from JSON."""
        ci95 = record["ci95"]
        return cls(**{**record, "ci95": None if ci95 is None else tuple(ci95)})

    def to_dict(self) -> dict[str, Any]:
        """The metrics, without the per-item outcomes and without the time it took: a file of
        metrics is the same bytes whenever the same model is scored on the same items."""
        result = asdict(self)
        del result["per_item"], result["seconds"]
        return result


def load_task_records(spec: TaskSpec, config: EvalConfig, *, data_dir=None) -> list:
    """The records a task is scored on (loading them first surfaces data errors early).

    Every evaluation of a comparison scores the same items: they are read once per process.
    """
    columns = json.dumps(spec.columns, sort_keys=True) if spec.columns else None
    limit = config.limit_for(spec.name)
    path = Path(spec.source)
    stamp = path.stat().st_mtime_ns if path.exists() else None  # an edited file rereads
    data_dir = str(data_dir) if data_dir else None
    return list(_task_records(spec.source, spec.kind, spec.split, columns, limit, data_dir, stamp))


@functools.lru_cache(maxsize=32)
def _task_records(source, kind, split, columns, limit, data_dir, stamp) -> tuple:
    record_kind = {"perplexity": "text", "multiple_choice": "multiple_choice"}.get(
        kind, "instruction"
    )
    return tuple(
        load_records(
            source,
            kind=record_kind,
            split=split,
            data_dir=data_dir,
            columns=json.loads(columns) if columns else None,
            limit=limit,
        )
    )


def score_task(
    model, tokenizer, spec: TaskSpec, records: list, config: EvalConfig, *, progress=True
) -> TaskResult:
    started = time.perf_counter()
    if spec.kind == "perplexity":
        texts = [record.text for record in records if isinstance(record, TextRecord)]
        result = perplexity(
            model,
            tokenizer,
            texts,
            max_length=config.scoring.ppl_max_length,
            batch_size=config.scoring.ppl_batch_size,
            progress=progress,
        )
        value, n = result.perplexity, len(texts)
        per_item = {
            "document_nll": list(result.document_nll),
            "document_tokens": list(result.document_tokens),
        }
    elif spec.kind == "multiple_choice":
        items = [record for record in records if isinstance(record, MultipleChoiceRecord)]
        result = score_multiple_choice(
            model,
            tokenizer,
            items,
            batch_tokens=config.scoring.batch_tokens,
            progress=progress,
            desc=spec.name,
        )
        value, n = result.accuracy, result.n
        per_item = {"correct": [int(item.correct) for item in result.items]}
    else:
        questions = [record for record in records if isinstance(record, InstructionRecord)]
        result = gsm8k_exact_match(
            model,
            tokenizer,
            questions,
            max_new_tokens=config.scoring.generation_max_new_tokens,
            batch_size=config.scoring.generation_batch_size,
            progress=progress,
        )
        value, n = result.accuracy, result.n
        per_item = {"correct": [int(item.correct) for item in result.items]}
    per_item_keys = ("items", "document_nll", "document_tokens")
    details = {key: val for key, val in result.to_dict().items() if key not in per_item_keys}
    return TaskResult(
        task=spec.name,
        kind=spec.kind,
        metric=spec.metric,
        value=float(value),
        higher_is_better=spec.higher_is_better,
        ci95=_ci95(details),
        n=n,
        seconds=time.perf_counter() - started,
        details=details,
        per_item=per_item,
    )


def _ci95(details: dict[str, Any]) -> tuple[float, float] | None:
    for key in ("accuracy_ci95", "perplexity_ci95"):
        interval = details.get(key)
        if interval is not None and all(math.isfinite(bound) for bound in interval):
            return (float(interval[0]), float(interval[1]))
    return None


def load_tasks(tasks: list[str], config: EvalConfig, *, data_dir=None) -> dict:
    """Parse every task name and load its records, before any model time is spent."""
    specs = [parse_task(task, config.tasks) for task in tasks]
    return {spec.name: (spec, load_task_records(spec, config, data_dir=data_dir)) for spec in specs}


def evaluate_tasks(
    model, tokenizer, tasks: list[str] | dict, config: EvalConfig, *, data_dir=None, progress=True
) -> dict[str, TaskResult]:
    """Evaluate every task (names, or the output of :func:`load_tasks`)."""
    loaded = tasks if isinstance(tasks, dict) else load_tasks(tasks, config, data_dir=data_dir)
    return {
        name: score_task(model, tokenizer, spec, records, config, progress=progress)
        for name, (spec, records) in loaded.items()
    }
