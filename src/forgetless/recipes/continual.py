"""The continual-learning harness: learn a sequence of tasks, evaluate every task after each.

A run trains on the tasks of a benchmark order one after another (``seqft``: full
fine-tuning, ``lora``: a LoRA per task merged before the next, ``osft``: OSFT with the SVD
recomputed on the current weights for every task, ``sotu``: each task fine-tuned from the base
on its own and the experts so far merged with sparse random masks, ``replay``: seqft plus a
buffer of every earlier task's records, ``ewc``: seqft with the online EWC penalty, ``olora``:
lora with O-LoRA's orthogonality penalty) or on all of them at once (``multitask``, the usual
upper bound), evaluates every task of the sequence after every stage, and reports the
accuracy matrix with average accuracy, BWT, FWT and forgetting
(:mod:`forgetless.report.continual`), plus a retention report on general tasks.

Every step is a fingerprinted :class:`~forgetless.runs.Stage`, so a killed run resumes
where it stopped and a rerun reuses finished stages. Layout under ``run_dir``::

    <benchmark>[-<subset>]/               e.g. fewshot-0_42/ or olora/
        eval_base/  retention_base/       the base model, shared by every order and method
        order<N>-<method>[@<variant>]/    a variant of a non-merging method (its own
                                          settings, e.g. a learning rate) trains on its own
            train_01_<task>/model/        plain HF checkpoint after task 1 (the next task
            [merge_01_<task>/model/]      starts from it; sotu: the merge of the experts so
            eval_01_<task>/tasks/*.json   far); every task's accuracy after task 1
            [merge_01_<task>@<variant>/, eval_01_<task>@<variant>/, ...]
                                          sotu with continual.variant: that merge's own
                                          stages, beside the shared experts
            [cil_01_<task>/]              the same with continual.head = closed_form
            [train_01_<task>/ewc_fisher.safetensors]       ewc: the Fishers summed so far
            [train_01_<task>/olora_subspaces.safetensors]  olora: the LoRA A's so far
            ...
            retention_final/metrics.json
            report/continual.{json,md,png}            (closed_form: report_closed_form/)

Each ``train_*/model`` is a full checkpoint in the training dtype (float32 unless
``model.dtype`` says otherwise), so 4 bytes per parameter: about 0.54 GB for SmolLM2-135M,
i.e. 2.2 GB for a fewshot sequence and 5.4 GB for an olora one. Training checkpoints are
deleted once a stage finishes; only the final model stays. ewc adds a float32 Fisher (the size
of a float32 checkpoint) per task.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetless.config import ForgetlessConfig
from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import ScoringConfig
from forgetless.evaluate.stages import EvaluateStage, load_stage_model
from forgetless.io import write_json_atomic
from forgetless.merge.stages import MergeExpertsStage
from forgetless.model_config import ModelConfig
from forgetless.recipes.strategies import ContinualStrategy
from forgetless.registry import lookup
from forgetless.report.continual import short_name
from forgetless.runs import (
    PlannedStage,
    RunDirectory,
    Stage,
    StageResult,
    StageSettings,
    run_directory,
)
from forgetless.train.config import TrainConfig

if TYPE_CHECKING:
    from forgetless.data.records import MultipleChoiceRecord

# O-LoRA's task orders (Wang et al., 2023). Orders 4-6 have 15 tasks; five of them (IMDB, Yelp,
# DBpedia, MultiRC, Yahoo) are not among our O-LoRA-format data sets, so each of these orders
# keeps the other ten tasks in their original relative order.
ORDERS: dict[str, dict[int, tuple[str, ...]]] = {
    "fewshot": {
        1: ("dbpedia", "amazon", "yahoo", "agnews"),
        2: ("dbpedia", "amazon", "agnews", "yahoo"),
        3: ("yahoo", "amazon", "agnews", "dbpedia"),
    },
    "olora": {
        4: ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "amazon", "sst2", "agnews"),
        5: ("boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "sst2", "agnews", "amazon"),
        6: ("amazon", "mnli", "cb", "copa", "qqp", "rte", "sst2", "agnews", "boolqa", "wic"),
    },
}
# Evaluation items are drawn with a fixed seed, not train.seed, so runs with different training
# seeds are scored on the same items.
EVAL_SAMPLE_SEED = 0
MODEL_DIR = "model"


def task_sequence(benchmark: str, order: int) -> list[str]:
    """The data set names of a benchmark order, in training order."""
    orders = ORDERS[benchmark]
    if order not in orders:
        valid = ", ".join(str(number) for number in orders)
        raise ForgetlessError(f"benchmark {benchmark} has no order {order}; choose one of: {valid}")
    return [f"{benchmark}_{name}" for name in orders[order]]


def sample_records(records: Sequence, limit: int | None, seed: int | str) -> list:
    """A seeded random subset of ``limit`` records, in file order (all of them without limit).

    Not the first N: the few-shot files are sorted by label, so a prefix holds one class.
    """
    if limit is None or limit >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]


def replay_buffer(data: TaskData, task: str, per_task: int, seed: int) -> list:
    """The records of an earlier ``task`` that every later task replays: ``per_task`` of the
    records it trained on (all of them if it has fewer), in file order.

    Seeded by the task's name as well as the train seed, so the buffers of two tasks are
    independent draws, and each later task (and a rerun) replays the same records.
    """
    return sample_records(data.train_records(task), per_task, seed=f"replay:{seed}:{task}")


def in_training_format(tokenizer, record: MultipleChoiceRecord) -> MultipleChoiceRecord:
    """The item with its query rendered exactly as training renders it (chat template).

    Training teaches the model to answer the chat-formatted query with the label, so the
    labels are scored as the assistant's reply to that same prompt; scoring the raw query would
    measure how far the learnt mapping transfers to another format instead.
    """
    from forgetless.data.features import as_instruction, chat_prompt_and_response

    prompt, _ = chat_prompt_and_response(tokenizer, as_instruction(record))
    return dataclasses.replace(record, query=prompt, delimiter="")


class TaskData:
    """Each task's training and evaluation records, loaded once per run."""

    def __init__(self, config: ForgetlessConfig):
        self.config = config
        continual = config.continual
        # Only the few-shot benchmark comes in seed splits.
        self.subset = continual.subset if continual.benchmark == "fewshot" else None
        self._loaded: dict[tuple, list] = {}

    def train_records(self, task: str) -> list:
        return self._load(task, "train", self.config.continual.train_limit, self.config.train.seed)

    def eval_records(self, task: str) -> list:
        continual = self.config.continual
        return self._load(task, continual.eval_split, continual.eval_limit, EVAL_SAMPLE_SEED)

    def _load(self, task: str, split: str, limit: int | None, seed: int) -> list:
        from forgetless.data import load_records

        key = (task, split, limit, seed)
        if key not in self._loaded:
            records = load_records(
                task,
                kind="multiple_choice",
                split=split,
                subset=self.subset,
                data_dir=self.config.data_dir,
            )
            self._loaded[key] = sample_records(records, limit, seed)
        return self._loaded[key]


def stage_train_config(config: ForgetlessConfig, index: int, count: int) -> TrainConfig:
    """The train section for task ``index`` of ``count`` (the multitask run: index 0)."""
    strategy = lookup("continual", config.continual.method).implementation
    update: dict[str, Any] = {"method": strategy.train_method}
    if strategy.per_task_osft:
        update["osft"] = config.train.osft.for_task(index, count)
    if strategy.joint and config.train.max_steps > 0:
        # As many optimizer steps as the whole sequence gets, so both see the same examples.
        update["max_steps"] = config.train.max_steps * count
    return config.train.model_copy(update=update)


class ContinualTrainSettings(StageSettings):
    tasks: tuple[str, ...]
    subset: str | None
    train_limit: int | None
    train: TrainConfig
    # The tasks trained before: OSFT calibrates on them, replay draws its buffer from them.
    earlier_tasks: tuple[str, ...]
    replay_per_task: int | None  # None: no replay
    penalty: str | None  # the strategy's penalty toward earlier tasks (ewc, olora), if any
    model: ModelConfig | None  # None: training continues the previous stage's model


class ContinualTrainStage(Stage):
    """Fine-tune the previous stage's model (or the base model) on one task, or on all."""

    def __init__(
        self,
        name: str,
        config: ForgetlessConfig,
        data: TaskData,
        tasks: list[str],
        train: TrainConfig,
        previous: str | None,
        earlier_tasks: list[str],
        strategy: ContinualStrategy,
    ):
        self.name, self.config, self.data = name, config, data
        self.tasks, self.train, self.previous = tasks, train, previous
        self.earlier_tasks = earlier_tasks
        # The first task has nothing to replay: it trains as seqft's does, and shares its stage.
        replaying = strategy.replay and earlier_tasks
        self.replay_per_task = config.continual.replay_per_task if replaying else None
        self.penalty = strategy.penalty
        self.depends_on = (previous,) if previous else ()

    def settings(self) -> ContinualTrainSettings:
        return ContinualTrainSettings(
            tasks=tuple(self.tasks),
            subset=self.data.subset,
            train_limit=self.config.continual.train_limit,
            train=self.train,
            earlier_tasks=tuple(self.earlier_tasks),
            replay_per_task=self.replay_per_task,
            penalty=self.penalty,
            model=self.config.model if self.previous is None else None,
        )

    def replayed(self) -> list:
        """The earlier tasks' records this stage replays (none without replay)."""
        if self.replay_per_task is None:
            return []
        return [
            record
            for task in self.earlier_tasks
            for record in replay_buffer(self.data, task, self.replay_per_task, self.train.seed)
        ]

    def training_records(self) -> list:
        """What this stage trains on: its tasks' records and any replayed ones, shuffled with
        the train seed when they mix several tasks."""
        records = [record for task in self.tasks for record in self.data.train_records(task)]
        replayed = self.replayed()
        if len(self.tasks) > 1 or replayed:
            records += replayed
            # One mixed stream rather than task blocks, whatever the sampler does.
            random.Random(self.train.seed).shuffle(records)
        return records

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.models import load_configured_model
        from forgetless.train.sft import CHECKPOINTS_DIR, train_model

        started = time.perf_counter()
        records = self.training_records()
        start_from = None
        if self.previous is not None:
            start_from = str(inputs[self.previous].directory / MODEL_DIR)
        loaded = load_configured_model(self.config.model, name=start_from, for_training=True)
        calibration = None
        if self.train.method == "osft":
            # The subspace to preserve is calibrated on what the model learnt so far; for the
            # first task train_model falls back to osft.calibration_data.
            earlier = [self.data.train_records(task) for task in self.earlier_tasks]
            calibration = [record for records in earlier for record in records] or None
        carried = self._carried(inputs, next(loaded.model.parameters()).device)
        callbacks = self._penalty_callbacks(loaded.model, carried)
        model, result = train_model(
            loaded.model,
            loaded.tokenizer,
            records,
            self.train,
            workdir,
            callbacks=callbacks,
            calibration_records=calibration,
            data_dir=self.config.data_dir,
        )
        # Checkpoints exist only to resume an interrupted stage; the final model stays.
        shutil.rmtree(workdir / CHECKPOINTS_DIR, ignore_errors=True)
        summary = result.to_dict()
        summary.update(
            model_dir=MODEL_DIR,
            tasks=self.tasks,
            records=len(records),
        )
        if self.replay_per_task is not None:
            summary["replayed"] = len(self.replayed())
        if self.penalty == "ewc":
            summary.update(self._carry_fisher(model, loaded.tokenizer, carried, callbacks, workdir))
        elif self.penalty == "olora":
            summary.update(self._carry_subspaces(carried, workdir))
        summary["seconds"] = time.perf_counter() - started
        return summary

    def _carried(self, inputs: dict[str, StageResult], device) -> dict[str, Any]:
        """What the previous task of a penalised sequence left for this one (empty for the
        first task): the summed Fisher (ewc) or the stacked LoRA A's (olora)."""
        from forgetless.io import load_tensors
        from forgetless.train.penalties import FISHER_FILE, SUBSPACES_FILE

        if self.penalty is None or self.previous is None:
            return {}
        folder = inputs[self.previous].directory
        if self.penalty == "ewc":
            return load_tensors(folder / FISHER_FILE, device)
        return load_tensors(folder / SUBSPACES_FILE)

    def _penalty_callbacks(self, model, carried: dict[str, Any]) -> list:
        from forgetless.train.penalties import EwcCallback, OloraCallback

        if not carried:
            return []
        if self.penalty == "ewc":
            # Built before training: the anchor is the weights this task starts from.
            return [EwcCallback(model, carried, self.train.ewc.lam)]
        return [OloraCallback(carried, self.train.olora.lam)]

    def _carry_fisher(self, model, tokenizer, carried, callbacks, workdir: Path) -> dict:
        """Add this task's Fisher to the earlier ones' and store the sum for the next task."""
        from forgetless.io import save_tensors
        from forgetless.train.penalties import FISHER_FILE, empirical_fisher

        samples = sample_records(
            self.data.train_records(self.tasks[0]), self.train.ewc.fisher_samples, self.train.seed
        )
        fisher = empirical_fisher(model, tokenizer, samples, self.train.max_length)
        for name, earlier in carried.items():
            fisher[name].add_(earlier)
        save_tensors(workdir / FISHER_FILE, fisher)
        # The penalty the trained weights pay toward the earlier tasks (None for the first).
        penalty = callbacks[0].penalty(model) if callbacks else None
        return {"fisher_samples": len(samples), "ewc_penalty": penalty}

    def _carry_subspaces(self, carried, workdir: Path) -> dict:
        """Stack this task's LoRA A's under the earlier ones' for the next task."""
        import torch

        from forgetless.io import save_tensors
        from forgetless.train.methods import ADAPTER_DIR
        from forgetless.train.penalties import SUBSPACES_FILE, adapter_subspaces, overlap

        current = adapter_subspaces(workdir / ADAPTER_DIR)
        stacked = {
            module: torch.cat([carried[module], value]) if module in carried else value
            for module, value in current.items()
        }
        save_tensors(workdir / SUBSPACES_FILE, stacked)
        # Σ ‖A_<t A_tᵀ‖²_F of the trained LoRA (None for the first task).
        return {"olora_overlap": overlap(carried, current) if carried else None}


class ContinualEvalSettings(StageSettings):
    # Sorted: the base evaluation is shared by every order of the same tasks.
    tasks: tuple[str, ...]
    subset: str | None
    split: str
    limit: int | None
    scoring: ScoringConfig
    model: ModelConfig | None  # None: the model of the upstream stage


class ContinualEvalStage(Stage):
    """Accuracy of one model (the base, or a training stage's) on every task of the sequence."""

    def __init__(
        self,
        name: str,
        config: ForgetlessConfig,
        data: TaskData,
        tasks: list[str],
        model_from: str | None = None,
    ):
        self.name, self.config, self.data, self.tasks = name, config, data, tasks
        self.model_from = model_from
        self.depends_on = (model_from,) if model_from else ()

    def settings(self) -> ContinualEvalSettings:
        continual = self.config.continual
        return ContinualEvalSettings(
            tasks=tuple(sorted(self.tasks)),
            subset=self.data.subset,
            split=continual.eval_split,
            limit=continual.eval_limit,
            scoring=self.config.evaluate.scoring,
            model=self.config.model if self.model_from is None else None,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.evaluate.tasks import TaskSpec, score_task

        loaded = load_stage_model(self.config.model, inputs, self.model_from)
        results: dict[str, dict[str, Any]] = {}
        for task in self.tasks:
            path = workdir / "tasks" / f"{task}.json"
            # An interrupted stage keeps the tasks it finished (the workdir is its partial dir).
            if not path.is_file():
                records = self.data.eval_records(task)
                items = [in_training_format(loaded.tokenizer, record) for record in records]
                spec = TaskSpec(task, task, "multiple_choice", self.config.continual.eval_split)
                scored = score_task(
                    loaded.model, loaded.tokenizer, spec, items, self.config.evaluate
                )
                # Per-item outcomes first: a task counts as done once its metrics exist.
                write_json_atomic(items_path(workdir, task), scored.per_item)
                write_json_atomic(path, scored.to_dict())
            results[task] = json.loads(path.read_text())
        return {
            # acc, not acc_norm: the labels are short class names the model is trained to emit
            # whole, so their full log-likelihood is what training optimises; dividing by the
            # length would favour long labels whose later tokens are near-certain.
            "accuracy": {task: result["value"] for task, result in results.items()},
        }


def items_path(workdir: Path, task: str) -> Path:
    """Per-item outcomes (``correct`` 0/1, in item order) of ``task`` in an eval stage."""
    return workdir / "tasks" / f"{task}.items.json"


HEAD_STATE = "closed_form_head.pt"


class ClosedFormSettings(StageSettings):
    tasks: tuple[str, ...]
    fit_tasks: tuple[str, ...]
    subset: str | None
    split: str
    limit: int | None
    train_limit: int | None
    projection_dim: int
    seed: int
    max_length: int


class ClosedFormEvalStage(Stage):
    """Class-incremental evaluation (SoTU's): add ``fit_tasks``' training features, taken from
    this stage's model, to the previous stage's closed-form head, then classify every task's
    items over all classes seen so far.

    The head keeps only Gram statistics, no old samples, so the statistics of earlier tasks
    stay those of the model at their own stage (``continual.head_statistics: accumulate``);
    with ``recompute`` there is no previous head and ``fit_tasks`` are all the tasks so far.
    """

    def __init__(
        self,
        name: str,
        config: ForgetlessConfig,
        data: TaskData,
        tasks: list[str],
        fit_tasks: list[str],
        model_from: str,
        previous_head: str | None,
    ):
        self.name, self.config, self.data, self.tasks = name, config, data, tasks
        self.fit_tasks, self.model_from, self.previous_head = fit_tasks, model_from, previous_head
        self.depends_on = (model_from, *((previous_head,) if previous_head else ()))

    def settings(self) -> ClosedFormSettings:
        continual = self.config.continual
        return ClosedFormSettings(
            tasks=tuple(self.tasks),
            fit_tasks=tuple(self.fit_tasks),
            subset=self.data.subset,
            split=continual.eval_split,
            limit=continual.eval_limit,
            train_limit=continual.train_limit,
            projection_dim=continual.projection_dim,
            seed=self.config.train.seed,
            max_length=self.config.train.max_length,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        import torch

        from forgetless.merge.closed_form import RandomProjectionRidge, extract_features

        started = time.perf_counter()
        loaded = load_stage_model(self.config.model, inputs, self.model_from)

        def features(records: list) -> torch.Tensor:
            prompts = [in_training_format(loaded.tokenizer, record).query for record in records]
            return extract_features(
                loaded.model, loaded.tokenizer, prompts, max_length=self.config.train.max_length
            )

        # Global class ids: each task's labels follow those of the tasks before it.
        offsets, total = {}, 0
        for task in self.tasks:
            offsets[task] = total
            total += len(self.data.eval_records(task)[0].choices)
        head = RandomProjectionRidge(
            loaded.model.config.hidden_size,
            self.config.continual.projection_dim,
            seed=self.config.train.seed,
        )
        if self.previous_head is not None:
            head.load(inputs[self.previous_head].directory / HEAD_STATE)
        for task in self.fit_tasks:
            records = self.data.train_records(task)
            labels = torch.tensor([offsets[task] + record.gold for record in records])
            head.partial_fit(features(records), labels)
        head.save(workdir / HEAD_STATE)
        accuracy = {}
        for task in self.tasks:
            records = self.data.eval_records(task)
            gold = torch.tensor([offsets[task] + record.gold for record in records])
            # Tasks not fitted yet come later in the sequence, so their class ids lie beyond
            # the head's outputs: they score 0, as class-incremental learning implies.
            correct = head.predict(features(records)) == gold
            accuracy[task] = float(correct.float().mean())
            write_json_atomic(items_path(workdir, task), {"correct": correct.int().tolist()})
            write_json_atomic(
                workdir / "tasks" / f"{task}.json",
                {"task": task, "metric": "acc", "value": accuracy[task], "n": len(records)},
            )
        return {
            "accuracy": accuracy,
            "ridge": head.ridge,
            "seconds": time.perf_counter() - started,
        }


def retention_stage(name: str, config: ForgetlessConfig, model_from: str | None = None):
    """The retention tasks (general abilities) on the base or the final model."""
    return EvaluateStage(
        name,
        config.model,
        config.evaluate,
        model_from=model_from,
        tasks=config.continual.retention_tasks,
        data_dir=config.data_dir,
    )


class ContinualReportSettings(StageSettings):
    benchmark: str
    order: int
    method: str
    variant: str | None
    head: str
    tasks: tuple[str, ...]
    model: str


class ContinualReportStage(Stage):
    def __init__(
        self,
        name: str,
        config: ForgetlessConfig,
        tasks: list[str],
        train_stages: list[str],
        eval_stages: list[str],
        retention: tuple[str, str] | None,
    ):
        self.name, self.config, self.tasks = name, config, tasks
        self.train_stages, self.eval_stages, self.retention = train_stages, eval_stages, retention
        self.depends_on = ("eval_base", *train_stages, *eval_stages, *(retention or ()))
        self.summary_inputs = tuple(train_stages)

    def settings(self) -> ContinualReportSettings:
        continual = self.config.continual
        return ContinualReportSettings(
            benchmark=continual.benchmark,
            order=continual.order,
            method=continual.method,
            variant=continual.variant,
            head=continual.head,
            tasks=tuple(self.tasks),
            model=self.config.model.name,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.report.continual import continual_metrics, write_continual_report
        from forgetless.report.retention import build_retention_report

        def task_results(stage: str) -> dict[str, Any]:
            folder = inputs[stage].directory / "tasks"
            return {task: json.loads((folder / f"{task}.json").read_text()) for task in self.tasks}

        def retention_metrics(stage: str) -> dict[str, Any]:
            return json.loads((inputs[stage].directory / "metrics.json").read_text())

        def final_items() -> dict[str, list[int]] | None:
            """The last stage's per-item outcomes, for paired comparisons between methods on
            the same items (absent for stages evaluated before outcomes were kept)."""
            folder = inputs[self.eval_stages[-1]].directory
            paths = {task: items_path(folder, task) for task in self.tasks}
            if not all(path.is_file() for path in paths.values()):
                return None
            return {
                task: [int(hit) for hit in json.loads(path.read_text())["correct"]]
                for task, path in paths.items()
            }

        base = task_results("eval_base")
        stages = [task_results(stage) for stage in self.eval_stages]
        base_row = [base[task]["value"] for task in self.tasks]
        matrix = [[row[task]["value"] for task in self.tasks] for row in stages]
        rows, change = [], None
        if self.retention is not None:
            retention = build_retention_report(
                retention_metrics(self.retention[0]),
                retention_metrics(self.retention[1]),
                domain_tasks=[],
                general_tasks=self.config.continual.retention_tasks,
            )
            rows, change = retention["rows"], retention["summary"]["general_improvement_pct"]
        seconds = {name: inputs[name].seconds or 0.0 for name in self.depends_on}
        continual = self.config.continual
        metrics = continual_metrics(matrix, base_row)
        if continual.head == "closed_form":
            # Before its own stage a task's classes are unknown to the head (accuracy 0), so
            # the base comparison measures nothing.
            metrics["fwt"] = None
        report = {
            "benchmark": continual.benchmark,
            "order": continual.order,
            "subset": continual.subset if continual.benchmark == "fewshot" else None,
            "method": continual.method,
            "variant": continual.variant,
            "head": continual.head,
            "model": self.config.model.name,
            "tasks": self.tasks,
            "evaluation": {
                "split": continual.eval_split,
                "limit": continual.eval_limit,
                "metric": "accuracy",
                "items": {task: base[task]["n"] for task in self.tasks},
            },
            "base": base_row,
            "matrix": matrix,
            "final_items": final_items(),
            "metrics": metrics,
            "retention": rows,
            "retention_change_pct": change,
            "training": [
                {"stage": name, "directory": str(inputs[name].directory), **inputs[name].summary}
                for name in self.train_stages
            ],
            "timings": {
                "stages": seconds,
                "train_seconds": sum(seconds[name] for name in self.train_stages),
                "eval_seconds": sum(
                    value for name, value in seconds.items() if name not in self.train_stages
                ),
            },
        }
        write_continual_report(report, workdir)
        return {"files": ["continual.json", "continual.md", "continual.png"]}


def sequence_stages(config: ForgetlessConfig, data: TaskData, tasks: list[str]) -> list[Stage]:
    """Training and evaluation stages of one order and method, then retention and the report.

    They depend on ``eval_base`` (and ``retention_base`` when there are retention tasks),
    which run in the shared base directory.
    """
    stages: list[Stage] = []
    strategy = lookup("continual", config.continual.method).implementation
    if strategy.joint:
        # One run on the union has no order: sorted, every order of the same tasks shares it
        # (and its evaluation, whose tasks are sorted too) instead of training it again.
        steps = [("train_all", sorted(tasks), 0, [])]
    else:
        steps = [
            (f"train_{i + 1:02d}_{short_name(task)}", [task], i, tasks[:i])
            for i, task in enumerate(tasks)
        ]
    merging = strategy.merge
    # A merge variant's own stages sit beside the shared experts under names of their own
    # (any other variant has a sequence folder of its own: _sequence_directory).
    variant = f"@{config.continual.variant}" if merging and config.continual.variant else ""
    previous = None
    train_names, eval_names, experts = [], [], []
    for name, trained_on, index, earlier in steps:
        train = stage_train_config(config, index, len(tasks))
        # sotu experts all start from the base model; the others continue the previous stage.
        start_from = None if strategy.from_base else previous
        stages.append(
            ContinualTrainStage(
                name, config, data, trained_on, train, start_from, earlier, strategy
            )
        )
        train_names.append(name)
        previous = name
        if merging:
            experts.append(name)
            previous = name.replace("train_", "merge_", 1) + variant
            stages.append(MergeExpertsStage(previous, config.model, config.merge, list(experts)))
            train_names.append(previous)
        if config.continual.head == "closed_form":
            # Own stage names, so both heads' results can sit beside the same trained models.
            evaluation = name.replace("train_", "cil_", 1) + variant
            if config.continual.head_statistics == "recompute":
                fit_tasks, head_from = tasks[: index + len(trained_on)], None
            else:
                fit_tasks, head_from = trained_on, eval_names[-1] if eval_names else None
            closed_form = ClosedFormEvalStage(
                evaluation, config, data, tasks, fit_tasks, previous, head_from
            )
            stages.append(closed_form)
        else:
            evaluation = name.replace("train_", "eval_", 1) + variant
            stages.append(ContinualEvalStage(evaluation, config, data, tasks, model_from=previous))
        eval_names.append(evaluation)
    retention = None
    if config.continual.retention_tasks:
        stages.append(retention_stage("retention_final" + variant, config, model_from=previous))
        retention = ("retention_base", "retention_final" + variant)
    report = ("report" if config.continual.head == "lm" else "report_closed_form") + variant
    stages.append(ContinualReportStage(report, config, tasks, train_names, eval_names, retention))
    return stages


def base_directory(config: ForgetlessConfig) -> Path:
    continual = config.continual
    suffix = f"-{continual.subset}" if continual.benchmark == "fewshot" else ""
    # Stage folders are named, not fingerprinted: runs scored on another split keep folders
    # of their own, or each would replace the other's evaluations.
    if continual.eval_split != "test":
        suffix += f"-{continual.eval_split}"
    return Path(config.run_dir) / f"{continual.benchmark}{suffix}"


def _checked_stages(config: ForgetlessConfig) -> tuple[list[Stage], list[Stage]]:
    """The base stages (shared by every order and method) and the sequence's stages, once
    every data or task-name mistake has been said, before a stage spends model time."""
    from forgetless.evaluate.tasks import load_tasks

    continual = config.continual
    tasks = task_sequence(continual.benchmark, continual.order)
    if continual.method == "sotu" and (config.merge.weights or config.merge.densities):
        # The number of merged experts grows task by task: no fixed list fits every merge.
        raise ForgetlessError(
            "merge.weights and merge.densities are per expert, but the continual sotu merge "
            "grows by one expert per task; use merge.keep (and merge.masks) instead"
        )
    data = TaskData(config)
    for task in tasks:
        data.train_records(task)
        data.eval_records(task)
    load_tasks(continual.retention_tasks, config.evaluate, data_dir=config.data_dir)
    RunDirectory(Path(config.run_dir))  # a file in its place is an error before any work
    base_stages: list[Stage] = [ContinualEvalStage("eval_base", config, data, tasks)]
    if continual.retention_tasks:
        base_stages.append(retention_stage("retention_base", config))
    return base_stages, sequence_stages(config, data, tasks)


def _sequence_directory(config: ForgetlessConfig) -> Path:
    continual = config.continual
    name = f"order{continual.order}-{continual.method}"
    if continual.variant and not lookup("continual", continual.method).implementation.merge:
        # Its training differs from the plain method's, so it cannot share the stage folders.
        name += f"@{continual.variant}"
    return base_directory(config) / name


def run_continual(
    config: ForgetlessConfig, on_event: Callable[[str, StageResult | str], None] | None = None
) -> dict[str, StageResult]:
    """Run (or resume) one continual-learning experiment; the ``report`` result holds
    ``continual.{json,md,png}``."""
    base_stages, stages = _checked_stages(config)
    results = run_directory(base_directory(config), config, on_event).run_all(base_stages)
    sequence = run_directory(_sequence_directory(config), config, on_event)
    results.update(sequence.run_all(stages, given=results))
    results["report"] = results[stages[-1].name]
    return results


def plan_continual(config: ForgetlessConfig) -> list[PlannedStage]:
    """What :func:`run_continual` would run and reuse, running nothing (``--dry-run``); the
    folders are relative to ``run_dir``."""
    base_stages, stages = _checked_stages(config)
    shared = run_directory(base_directory(config), config)
    base = shared.plan({"": base_stages})
    # The sequence's stages consume the base ones by fingerprint; nothing of them is read.
    given = {
        planned.stage: StageResult(
            planned.stage, planned.fingerprint, shared.root / planned.folder, {}, True
        )
        for planned in base
    }
    sequence = run_directory(_sequence_directory(config), config)

    def from_run_dir(runs: RunDirectory, planned: PlannedStage) -> PlannedStage:
        folder = (runs.root / planned.folder).relative_to(config.run_dir)
        return dataclasses.replace(planned, folder=str(folder))

    return [from_run_dir(shared, planned) for planned in base] + [
        from_run_dir(sequence, planned) for planned in sequence.plan({"": stages}, given=given)
    ]
