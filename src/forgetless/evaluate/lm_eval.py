"""lm-evaluation-harness both ways: our tasks as lm-eval task configs, lm-eval tasks on our models.

``export_tasks`` writes each forgetless task as a local lm-eval task: a jsonl of the very items
forgetless scores (after ``limit`` / ``task_limits``) and a YAML that reads it, plus the group
``forgetless_retention`` listing them. Multiple-choice tasks are scored the same way by both
tools (``scripts/compare_lm_eval.py`` checks it item by item). Perplexity tasks become
``loglikelihood_rolling`` tasks, for which lm-eval reports word and byte perplexity and bits per
byte, never our token perplexity: the numbers are comparable between models, not with ours.
GSM8K is refused: our prompt, stop rule and number normalisation have no lm-eval equivalent.

``run_lm_eval`` evaluates a checkpoint, hub id, model alias or ``forgetless run`` directory
(its final model) with lm-eval tasks, offline. lm-eval is an optional extra
(``pip install 'forgetless[lmeval]'``) and is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from forgetless.data.records import MultipleChoiceRecord, TextRecord
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.tasks import TaskSpec, load_tasks
from forgetless.io import write_text_atomic
from forgetless.runs import STAGE_RECORD

TASK_PREFIX = "forgetless_"
GROUP_NAME = "forgetless_retention"
INSTALL_HINT = "pip install 'forgetless[lmeval]'"
# Raised only when a task's version changes what it scores; lm-eval prints it with results.
TASK_VERSION = 1.0
MULTIPLE_CHOICE_METRICS = ("acc", "acc_norm")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
# Stages that hand a model on name its folder under this key of their summary.
MODEL_DIR_KEY = "model_dir"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# The same switches once read into module globals (module, attribute).
OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


# --------------------------------------------------------------------------------------------
# Export: forgetless tasks -> lm-eval task configs.


def lm_eval_task_name(task: str) -> str:
    """The lm-eval name of a forgetless task (``ppl:pubmedqa@test`` ->
    ``forgetless_ppl_pubmedqa_test``)."""
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", task).strip("_")


def export_tasks(
    task_names: Sequence[str],
    evaluate_config: EvalConfig,
    output_dir: str | Path,
    data_dir: str | Path | None = None,
) -> list[Path]:
    """Write every task's items (jsonl) and lm-eval config (YAML), then the group YAML.

    Returns the written files in that order. The same tasks, items and ``output_dir`` give the
    same bytes. Everything is checked before the first file is written.
    """
    if not task_names:
        raise ForgetlessError("no tasks to export")
    prepared = load_tasks(list(task_names), evaluate_config, data_dir=data_dir)
    exports = [_prepare_export(spec, records) for spec, records in prepared.values()]
    _check_unique_names(exports)
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ForgetlessError(f"output directory {output_dir} exists and is not a directory")
    written: list[Path] = []
    for export in exports:
        written += export.write(output_dir)
    group_file = output_dir / f"{GROUP_NAME}.yaml"
    group = {
        "group": GROUP_NAME,
        "task": [export.name for export in exports],
        "metadata": {"version": TASK_VERSION},
    }
    write_text_atomic(group_file, _header("the forgetless retention suite") + _yaml(group))
    return [*written, group_file]


class _TaskExport:
    """One task's rows and lm-eval config, ready to be written."""

    def __init__(self, spec: TaskSpec, rows: list[dict], config: dict[str, Any]):
        self.source_task = spec.name
        self.name = lm_eval_task_name(spec.name)
        self.rows = rows
        self.config = config

    def write(self, output_dir: Path) -> list[Path]:
        data_file = output_dir / f"{self.name}.jsonl"
        config_file = output_dir / f"{self.name}.yaml"
        lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        write_text_atomic(data_file, "".join(lines))
        config = {
            "task": self.name,
            "dataset_path": "json",
            # lm-eval resolves relative paths against its working directory, not this file.
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test",
            **self.config,
            "metadata": {"version": TASK_VERSION},
        }
        what = f"forgetless task {self.source_task!r} ({len(self.rows)} items)"
        write_text_atomic(config_file, _header(what) + _yaml(config))
        return [data_file, config_file]


def _prepare_export(spec: TaskSpec, records: list) -> _TaskExport:
    if spec.kind == "multiple_choice":
        return _multiple_choice_export(spec, records)
    if spec.kind == "perplexity":
        return _perplexity_export(spec, records)
    raise ForgetlessError(
        f"task {spec.name!r} is scored by generation, which has no faithful lm-eval export "
        "(our prompt, stop rule and answer normalisation differ from lm-eval's); drop it "
        "from --tasks, or run lm-eval's own task of that name with `forgetless lm-eval run`"
    )


def _multiple_choice_export(spec: TaskSpec, records: list) -> _TaskExport:
    items = [record for record in records if isinstance(record, MultipleChoiceRecord)]
    delimiters = {record.delimiter for record in items}
    if len(delimiters) > 1:
        # One task config has one target_delimiter.
        raise ForgetlessError(
            f"task {spec.name!r} mixes choice delimiters {sorted(delimiters)}; lm-eval needs one"
        )
    rows = [
        {"id": item.id, "query": item.query, "choices": list(item.choices), "gold": item.gold}
        for item in items
    ]
    config = {
        "output_type": "multiple_choice",
        # Field names, not templates: lm-eval then passes the strings through untouched.
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": delimiters.pop() if delimiters else " ",
        "metric_list": _metrics(MULTIPLE_CHOICE_METRICS, higher_is_better=True),
    }
    return _TaskExport(spec, rows, config)


def _perplexity_export(spec: TaskSpec, records: list) -> _TaskExport:
    rows = [
        {"id": record.id, "text": record.text}
        for record in records
        if isinstance(record, TextRecord)
    ]
    config = {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": _metrics(PERPLEXITY_METRICS, higher_is_better=False),
    }
    return _TaskExport(spec, rows, config)


def _metrics(names: Sequence[str], *, higher_is_better: bool) -> list[dict[str, Any]]:
    if higher_is_better:
        return [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in names]
    # lm-eval's perplexity metrics aggregate over the whole corpus, by their own defaults.
    return [{"metric": name} for name in names]


def _check_unique_names(exports: list[_TaskExport]) -> None:
    seen: dict[str, str] = {}
    for export in exports:
        other = seen.setdefault(export.name, export.source_task)
        if other != export.source_task:
            raise ForgetlessError(
                f"tasks {other!r} and {export.source_task!r} would both be exported as "
                f"{export.name!r}; export them separately"
            )
    if GROUP_NAME in seen:
        raise ForgetlessError(f"a task may not be exported as the group name {GROUP_NAME!r}")


def _header(what: str) -> str:
    return f"# lm-evaluation-harness config for {what}; written by `forgetless lm-eval export`.\n"


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# A forgetless run directory -> its final model.


def final_model(run_dir: str | Path) -> Path:
    """The adapted model of a finished ``forgetless run`` (or continual) directory.

    The run's report stage consumes the model it reports on: the last of its inputs that
    hands on a model (the train or merge stage; in a continual run, the last task's). A run
    without a finished report is unfinished, whatever stages it has.
    """
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise ForgetlessError(f"run directory {root} not found")
    reports = sorted(root.glob(f"report*/{STAGE_RECORD}"))
    if not reports:
        raise ForgetlessError(_no_report_message(root))
    models = {_report_model(root, report) for report in reports}
    if len(models) > 1:
        listed = ", ".join(str(model) for model in sorted(models))
        raise ForgetlessError(f"run {root} reports on several models ({listed}); pass one")
    return models.pop()


def _no_report_message(root: Path) -> str:
    arms = sorted(report.parent.parent for report in root.glob(f"*/report*/{STAGE_RECORD}"))
    if arms:
        listed = ", ".join(str(arm) for arm in dict.fromkeys(arms))
        return f"{root} holds several runs (a comparison); pass one of them: {listed}"
    if any(root.glob(f"*/{STAGE_RECORD}")) or any(root.glob("*.partial-*")):
        return (
            f"run {root} is unfinished: it has no report yet; resume it (`forgetless run` with "
            "the same config and --run-dir) before evaluating its model"
        )
    return f"{root} is neither a model checkpoint (no config.json) nor a forgetless run directory"


def _stage_folders(base: Path) -> dict[str, Path]:
    """fingerprint -> folder of every finished stage in ``base``, at the depths where
    ``RunDirectory`` puts them."""
    folders: dict[str, Path] = {}
    for depth in ("*", "*/*"):
        for record_file in base.glob(f"{depth}/{STAGE_RECORD}"):
            fingerprint = _read_record(record_file).get("fingerprint")
            if isinstance(fingerprint, str):
                folders[fingerprint] = record_file.parent
    return folders


def _report_model(root: Path, report: Path) -> Path:
    inputs = _read_record(report).get("inputs", {})
    folders = _stage_folders(root)
    if any(fingerprint not in folders for fingerprint in inputs.values()):
        # Stages a run shares with others (a comparison's arms, a continual run's base
        # evaluation) live one level up; the run's own folders win.
        folders = {**_stage_folders(root.parent), **folders}
    models = []
    for stage, fingerprint in inputs.items():
        folder = folders.get(fingerprint)
        if folder is None:
            raise ForgetlessError(f"run {root}: stage {stage!r}, read by its report, is gone")
        model_dir = _read_record(folder / STAGE_RECORD).get("summary", {}).get(MODEL_DIR_KEY)
        if model_dir:
            models.append(_inside(folder, model_dir))
    if not models:
        raise ForgetlessError(f"run {root}: its report ({report.parent.name}) names no model")
    model = models[-1]
    if not (model / "config.json").is_file():
        raise ForgetlessError(f"run {root}: the final model {model} is missing or incomplete")
    return model


def _inside(folder: Path, name: str) -> Path:
    # The name is read back from stage.json: it must not lead out of the stage's folder.
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ForgetlessError(f"{folder / STAGE_RECORD}: {MODEL_DIR_KEY} leaves the stage")
    return folder / name


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ForgetlessError(f"cannot read stage record {path}: {err}") from None
    return record if isinstance(record, dict) else {}


def resolve_model(model: str | Path) -> str:
    """A run directory becomes its final model; a checkpoint, hub id or alias stays as is."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        return str(final_model(path))
    return str(model)


# --------------------------------------------------------------------------------------------
# Run: lm-eval tasks on a forgetless model.


def run_lm_eval(
    model: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    revision: str | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` (names, groups or tags); JSON-able metrics.

    ``model`` is a checkpoint folder, hub id (from the local cache), forgetless model alias or
    ``forgetless run`` directory. ``include_path`` is a folder of extra task configs (what
    :func:`export_tasks` wrote). ``log_samples`` adds every item's metrics under ``samples``.
    """
    if not tasks:
        raise ForgetlessError("no lm-eval tasks given")
    _import_lm_eval()  # before anything slow
    from forgetless.models import load_model

    resolved = resolve_model(model)
    with hub_offline():
        # Task names are checked before the model spends time loading.
        task_manager = task_manager_for(tasks, include_path)
        loaded = load_model(resolved, device=device or "auto", revision=revision)
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        try:
            output = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager,
                limit=limit,
                log_samples=log_samples,
            )
        except ConnectionError as err:  # what the offline hub raises for a missing file
            raise ForgetlessError(
                f"lm-eval needs a file that is not on this machine ({_first_line(err)}); "
                "lm-eval runs offline here: put the task's data set in the local Hugging Face "
                "cache, or evaluate an exported forgetless task"
            ) from None
    if output is None:
        raise ForgetlessError("lm-eval returned no results")
    summary = {
        "model": str(model),
        "resolved_model": resolved,
        "lm_eval_version": version("lm_eval"),
        "limit": limit,
        "results": {
            task: metrics
            for task, values in output["results"].items()
            if (metrics := _task_metrics(values))  # a group without aggregate has none
        },
        "n_samples": {
            task: int(counts["effective"]) for task, counts in output.get("n-samples", {}).items()
        },
    }
    if log_samples:
        summary["samples"] = {
            task: _sample_metrics(samples, summary["results"].get(task, {}))
            for task, samples in output["samples"].items()
        }
    return summary


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ForgetlessError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None
    return lm_eval


def task_manager_for(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's task index holding every one of ``tasks``, else one line naming the others.

    Indexing lm-eval's ~15,000 built-in tasks takes half a minute, so tasks that are all in
    ``include_path`` are served from that folder alone. Exported tasks (``forgetless_*``)
    exist only in an export's folder, so one missing there is unknown without the full index.
    """
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    folder = None
    if include_path is not None:
        folder = Path(include_path).expanduser().resolve()
        if not folder.is_dir():
            raise ForgetlessError(f"include path {folder} is not a directory")
        own = TaskManager(include_path=str(folder), include_defaults=False)
        if all(task in own.all_tasks for task in tasks):
            return own
        _refuse_unknown([task for task in tasks if task.startswith(TASK_PREFIX)], own, folder)
    else:
        exported = [task for task in tasks if task.startswith(TASK_PREFIX)]
        if exported:
            raise ForgetlessError(
                f"unknown lm-eval task(s): {', '.join(exported)}; exported forgetless tasks "
                "need --include-path DIR (the folder `forgetless lm-eval export` wrote)"
            )
    manager = TaskManager(include_path=str(folder) if folder else None)
    _refuse_unknown(tasks, manager, folder)
    return manager


def _refuse_unknown(tasks: Sequence[str], task_manager, folder: Path | None) -> None:
    known = set(task_manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if not unknown:
        return
    hints = []
    for task in unknown:
        close = difflib.get_close_matches(task, known, n=3)
        hints.append(f"{task} (did you mean {', '.join(close)}?)" if close else task)
    where = f"lm-eval or {folder}" if folder else "lm-eval"
    raise ForgetlessError(f"unknown task(s) in {where}: {'; '.join(hints)}")


def _task_metrics(values: dict[str, Any]) -> dict[str, Any]:
    """``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}``; a filter other than lm-eval's
    default ``none`` stays in the name (``exact_match,strict-match``)."""
    metrics: dict[str, Any] = {}
    for key, value in values.items():
        name, _, kept = key.partition(",")
        if not kept:
            continue  # alias, sample counts: not metrics
        metrics[name if kept == "none" else key] = _plain(value)
    return metrics


def _sample_metrics(samples: list[dict[str, Any]], metrics: dict[str, Any]) -> list[dict]:
    names = [name for name in metrics if not name.endswith("_stderr")]
    rows = [
        {"doc_id": int(sample["doc_id"])}
        | {name: _plain(sample[name]) for name in names if name in sample}
        for sample in samples
    ]
    return sorted(rows, key=lambda row: row["doc_id"])


def _plain(value: Any) -> Any:
    """numpy scalars and tuples (lm-eval's per-sample perplexity pairs) as JSON values."""
    if isinstance(value, (list, tuple)):
        return [_plain(part) for part in value]
    if hasattr(value, "item"):
        return value.item()
    return value


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No request reaches a hub while lm-eval runs: every file it needs is local.

    ``huggingface_hub`` and ``datasets`` read the offline variables once, at import, and they
    are usually imported already, so their flags are switched too; all is restored after.
    """
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_flags = []
    for module_name, attribute in OFFLINE_FLAGS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            saved_flags.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, True)
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    try:
        yield
    finally:
        for module, attribute, value in saved_flags:
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
