"""Selection runs: the stages from pool to selected subset, cached in a run directory.

    warmup (lora only) -> gradients_{anchor,validation,pool|featured} -> [navigator_inputs
    -> navigator] (ogs only) -> selection_<method>

The pool is the config's data section. Unless a validation set is given, ``validation_samples``
records are held out of the pool (seeded) and never selected. ``ogs`` featurises only a seeded
``featured_samples`` part of the pool with gradients (stage ``gradients_featured``); the other
gradient methods featurise all of it (``gradients_pool``). Every method has its own selection
stage, so several methods share one run directory and its gradients.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.config import ForgetlessConfig, TrainConfig
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.pipeline import RunDirectory, Stage, StageResult, write_json_atomic

SELECTED_FILE = "selected.jsonl"
GRADIENT_METHODS = ("less", "orthogonal", "ogs")


@dataclass
class SelectionData:
    """The pool split into candidates, validation and (for ogs) the featured part."""

    candidates: list[Record]
    validation: list[Record]
    featured: list[int]  # indices into candidates

    @classmethod
    def load(cls, config: ForgetlessConfig) -> SelectionData:
        from forgetless.data import load_records
        from forgetless.pipeline import load_training_records

        select = config.select
        pool = load_training_records(config)
        rng = np.random.default_rng(select.seed)
        if select.validation is None:
            if len(pool) <= select.validation_samples:
                raise ForgetlessError(
                    f"the pool has {len(pool)} records, too few to hold out "
                    f"validation_samples={select.validation_samples}; give select.validation"
                )
            held = set(rng.permutation(len(pool))[: select.validation_samples].tolist())
            validation = [pool[i] for i in sorted(held)]
            candidates = [record for i, record in enumerate(pool) if i not in held]
        else:
            validation = load_records(
                select.validation,
                kind=config.data.kind,
                split=select.validation_split,
                data_dir=config.data_dir,
                limit=select.validation_samples,
            )
            candidates = pool
        if select.method == "ogs" and select.featured_samples < len(candidates):
            featured = sorted(rng.permutation(len(candidates))[: select.featured_samples].tolist())
        else:
            featured = list(range(len(candidates)))
        return cls(candidates, validation, featured)

    def budget_count(self, budget: float) -> int:
        return max(1, min(len(self.candidates), round(budget * len(self.candidates))))


def load_anchor(config: ForgetlessConfig) -> list[Record]:
    from forgetless.data import load_records

    select = config.select
    return load_records(
        select.anchor,
        split=select.anchor_split,
        data_dir=config.data_dir,
        limit=select.anchor_samples,
    )


def _settings(config: ForgetlessConfig, *exclude: str) -> dict[str, Any]:
    return {
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "select": config.select.model_dump(mode="json", exclude=set(exclude)),
    }


# Settings that do not change gradients (they only steer what is done with them).
NOT_GRADIENT_SETTINGS = ("navigator", "budget", "cost", "cost_limit", "anchor_rank")


class WarmupStage(Stage):
    """Train the LoRA adapter whose gradients are the features (LESS's warm-up)."""

    name = "warmup"

    def __init__(self, config: ForgetlessConfig):
        self.config = config

    def settings(self) -> dict[str, Any]:
        # The adapter trains on the pool only: the anchor and the method do not change it.
        anchor = ("anchor", "anchor_split", "anchor_samples")
        return _settings(self.config, *NOT_GRADIENT_SETTINGS, "method", "featured_samples", *anchor)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.models import load_configured_model
        from forgetless.train.sft import train_model

        started = time.perf_counter()
        gradient = self.config.select.gradient
        data = SelectionData.load(self.config)
        train = TrainConfig(
            method="lora",
            learning_rate=gradient.warmup_learning_rate,
            max_steps=gradient.warmup_steps,
            batch_size=gradient.batch_size,
            max_length=gradient.max_length,
            lr_scheduler="linear",
            seed=self.config.select.seed,
            save_steps=max(1, gradient.warmup_steps),
            lora={
                "r": gradient.lora_r,
                "alpha": gradient.lora_alpha,
                "dropout": 0.0,
                "target_modules": gradient.lora_target_modules,
            },
        )
        loaded = load_configured_model(self.config.model, for_training=True)
        _, result = train_model(loaded.model, loaded.tokenizer, data.candidates, train, workdir)
        # Only the adapter is needed; the merged model and the resume checkpoints are not.
        shutil.rmtree(workdir / "model", ignore_errors=True)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        summary = {"adapter_dir": "adapter", "warmup": result.to_dict()}
        return {**summary, "seconds": time.perf_counter() - started}


def load_feature_model(config: ForgetlessConfig, inputs: dict[str, StageResult]):
    """The model whose gradients are features: the base, plus the warm-up adapter for lora."""
    from forgetless.models import load_configured_model

    loaded = load_configured_model(config.model, for_training=True)
    if config.select.gradient.parameters == "lora":
        from peft import PeftModel

        adapter = inputs["warmup"].directory / "adapter"
        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter), is_trainable=True)
    return loaded


class GradientStage(Stage):
    def __init__(self, config: ForgetlessConfig, role: str, progress: bool = True):
        self.config, self.role, self.progress = config, role, progress
        self.name = f"gradients_{role}"
        self.depends_on = ("warmup",) if config.select.gradient.parameters == "lora" else ()

    def settings(self) -> dict[str, Any]:
        excluded = [*NOT_GRADIENT_SETTINGS, "method"]
        if self.role != "featured":
            excluded.append("featured_samples")
        if self.role == "anchor":
            excluded += ["validation", "validation_split", "validation_samples"]
        else:
            excluded += ["anchor", "anchor_split", "anchor_samples"]
        settings = _settings(self.config, *excluded)
        settings["role"] = self.role
        return settings

    def records(self) -> list[Record]:
        if self.role == "anchor":
            return load_anchor(self.config)
        data = SelectionData.load(self.config)
        if self.role == "validation":
            return data.validation
        if self.role == "featured":
            return [data.candidates[i] for i in data.featured]
        return data.candidates

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.gradients import extract_gradient_features

        started = time.perf_counter()
        records = self.records()
        loaded = load_feature_model(self.config, inputs)
        features = extract_gradient_features(
            loaded.model,
            loaded.tokenizer,
            records,
            self.config.select.gradient,
            workdir,
            seed=self.config.select.seed,
            progress=self.progress,
            description=self.name,
        )
        return {
            "samples": len(features.ids),
            "usable": int(features.valid.sum()),
            "seconds": time.perf_counter() - started,
        }


class NavigatorInputsStage(Stage):
    """Gradient-free features of every candidate: embedding, log length, base-model loss."""

    name = "navigator_inputs"

    def __init__(self, config: ForgetlessConfig, progress: bool = True):
        self.config, self.progress = config, progress

    def settings(self) -> dict[str, Any]:
        settings = _settings(self.config, "navigator", "budget", "cost", "cost_limit")
        settings["select"] = {
            key: settings["select"][key] for key in ("validation", "validation_samples", "seed")
        }
        settings["navigator_features"] = self.config.select.navigator.features
        settings["embedder"] = self.config.select.navigator.embedder
        settings["max_length"] = self.config.select.gradient.max_length
        return settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.inputs import navigator_inputs

        started = time.perf_counter()
        data = SelectionData.load(self.config)
        matrix, columns = navigator_inputs(data.candidates, self.config, progress=self.progress)
        np.save(workdir / "inputs.npy", matrix)
        write_json_atomic(workdir / "columns.json", columns)
        return {
            "samples": len(matrix),
            "columns": len(columns),
            "seconds": time.perf_counter() - started,
        }


def _scores(config: ForgetlessConfig, inputs: dict[str, StageResult], pool_stage: str):
    """Per-sample utility/orthogonality/conflict of the featured pool, and the anchor."""
    from forgetless.select.gradients import load_gradient_features
    from forgetless.select.metrics import anchor_from_gradients, domain_direction, score_samples

    def features(role: str):
        return load_gradient_features(inputs[f"gradients_{role}"].directory)

    anchor_features = features("anchor")
    validation_features = features("validation")
    anchor = anchor_from_gradients(
        anchor_features.dense()[anchor_features.valid], config.select.anchor_rank
    )
    target = domain_direction(validation_features.dense()[validation_features.valid])
    pool = load_gradient_features(inputs[pool_stage].directory)
    return score_samples(pool.dense(), anchor, target), pool.valid, anchor


def supervised_reference_spearman(
    train_inputs: np.ndarray, train_target: np.ndarray, test_inputs: np.ndarray, test_target
) -> float:
    """Held-out Spearman of a ridge regression fitted directly to the Lagrangian score.

    A reference for the Navigator: if even a supervised fit of the same inputs does not rank
    unseen samples, the inputs carry no signal about the gradient geometry, and no policy
    training would help.
    """
    from scipy.stats import spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_inputs, train_target)
    return float(spearmanr(model.predict(test_inputs), test_target).statistic)


class NavigatorStage(Stage):
    name = "navigator"

    def __init__(self, config: ForgetlessConfig, pool_stage: str, progress: bool = True):
        self.config, self.pool_stage, self.progress = config, pool_stage, progress
        self.depends_on = (
            "gradients_anchor",
            "gradients_validation",
            pool_stage,
            "navigator_inputs",
        )

    def settings(self) -> dict[str, Any]:
        return _settings(self.config)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        import torch
        from scipy.stats import spearmanr

        from forgetless.select.metrics import constrained_top_k
        from forgetless.select.navigator import log_as_dicts, top_k_quality, train_navigator

        started = time.perf_counter()
        select = self.config.select
        data = SelectionData.load(self.config)
        scores, valid, _ = _scores(self.config, inputs, self.pool_stage)
        pool_inputs = np.load(inputs["navigator_inputs"].directory / "inputs.npy")
        featured = np.asarray(data.featured)[valid]
        cost = scores.cost(select.cost)[valid]
        utility = scores.utility[valid]
        limit = select.cost_limit * float(cost.mean())
        rng = np.random.default_rng(select.seed + 1)
        order = rng.permutation(len(featured))
        held = max(0, min(len(featured) - 2, round(select.navigator.holdout * len(featured))))
        held_out, trained = np.sort(order[:held]), np.sort(order[held:])
        navigator, log = train_navigator(
            pool_inputs[featured[trained]],
            utility[trained],
            cost[trained],
            select.navigator,
            budget=select.budget,
            cost_limit=limit,
            seed=select.seed,
            progress=self.progress,
        )
        torch.save(navigator.state_dict(), workdir / "navigator.pt")
        write_json_atomic(workdir / "log.json", log_as_dicts(log))
        summary: dict[str, Any] = {
            "cost_limit": limit,
            "trained_on": int(len(trained)),
            "final": log_as_dicts(log[-1:])[0],
        }
        summary["seconds"] = time.perf_counter() - started
        if held:
            # How the Navigator ranks samples it never saw, against the exact (gradient)
            # Lagrangian choice at its final multiplier and against a random pick.
            logits = navigator.score(pool_inputs[featured[held_out]])
            lam = log[-1].lam
            oracle = utility[held_out] - lam * cost[held_out]
            exact, _ = constrained_top_k(
                utility[held_out], cost[held_out], math.ceil(select.budget * held), limit
            )
            summary["held_out"] = {
                "samples": held,
                "spearman_vs_lagrangian": float(spearmanr(logits, oracle).statistic),
                "supervised_spearman_vs_lagrangian": supervised_reference_spearman(
                    pool_inputs[featured[trained]],
                    utility[trained] - lam * cost[trained],
                    pool_inputs[featured[held_out]],
                    oracle,
                ),
                "navigator_top": top_k_quality(
                    logits, utility[held_out], cost[held_out], select.budget
                ),
                "exact_top": {
                    "utility": float(utility[held_out][exact].mean()),
                    "cost": float(cost[held_out][exact].mean()),
                },
                "pool_mean": {
                    "utility": float(utility[held_out].mean()),
                    "cost": float(cost[held_out].mean()),
                },
            }
        return summary


class SelectionStage(Stage):
    def __init__(self, config: ForgetlessConfig, pool_stage: str):
        self.config, self.pool_stage = config, pool_stage
        method = config.select.method
        # One stage per method, so that the methods can share one run directory (and its
        # gradients) and be compared side by side.
        self.name = f"selection_{method}"
        if method in GRADIENT_METHODS:
            self.depends_on = ("gradients_anchor", "gradients_validation", pool_stage)
        if method == "ogs":
            self.depends_on += ("navigator_inputs", "navigator")

    def settings(self) -> dict[str, Any]:
        return _settings(self.config)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.metrics import constrained_top_k
        from forgetless.select.report import write_selection

        select = self.config.select
        data = SelectionData.load(self.config)
        k = data.budget_count(select.budget)
        scores = valid = None
        extra: dict[str, Any] = {}
        if select.method == "random":
            rng = np.random.default_rng(select.seed)
            ranking = rng.permutation(len(data.candidates))[:k]
            ranked_scores = np.zeros(k)
        else:
            scores, valid, anchor = _scores(self.config, inputs, self.pool_stage)
            extra["anchor_energy_captured"] = anchor.captured
            cost = scores.cost(select.cost)
            limit = select.cost_limit * float(cost[valid].mean())
            if select.method == "ogs":
                ranking, ranked_scores = self._navigator_ranking(inputs, k)
            else:
                # Samples with nothing to learn have no gradient: rank them last.
                utility = np.where(valid, scores.utility, -np.inf)
                if select.method == "less":
                    ranking = np.argsort(-utility, kind="stable")[:k]
                    ranked_scores = utility[ranking]
                else:
                    usable = np.flatnonzero(valid)
                    chosen, lam = constrained_top_k(scores.utility[usable], cost[usable], k, limit)
                    ranking = usable[chosen]
                    ranked_scores = utility[ranking] - lam * cost[ranking]
                    extra["lagrange_multiplier"] = lam
            extra["cost_limit"] = limit
        return write_selection(
            workdir, self.config, data, ranking, ranked_scores, scores, valid, extra
        )

    def _navigator_ranking(self, inputs, k):
        import torch

        from forgetless.select.navigator import Navigator

        pool_inputs = np.load(inputs["navigator_inputs"].directory / "inputs.npy")
        navigator = Navigator(pool_inputs.shape[1], self.config.select.navigator.hidden_size)
        navigator.load_state_dict(torch.load(inputs["navigator"].directory / "navigator.pt"))
        logits = navigator.score(pool_inputs)
        ranking = np.argsort(-logits, kind="stable")[:k]
        return ranking, logits[ranking]


def selection_stages(config: ForgetlessConfig, progress: bool = True) -> list[Stage]:
    method = config.select.method
    data = SelectionData.load(config)
    # ogs featurises a part of the pool; a stage of its own keeps the whole pool's gradients
    # (used by less and orthogonal) cached beside it.
    pool_role = "featured" if len(data.featured) < len(data.candidates) else "pool"
    stages: list[Stage] = []
    if method in GRADIENT_METHODS:
        if config.select.gradient.parameters == "lora":
            stages.append(WarmupStage(config))
        roles = ("anchor", "validation", pool_role)
        stages += [GradientStage(config, role, progress) for role in roles]
    pool_stage = f"gradients_{pool_role}"
    if method == "ogs":
        stages += [
            NavigatorInputsStage(config, progress),
            NavigatorStage(config, pool_stage, progress),
        ]
    stages.append(SelectionStage(config, pool_stage))
    return stages


def run_selection(
    config: ForgetlessConfig, output_dir: str | Path, *, progress: bool = True, on_event=None
) -> dict[str, StageResult]:
    """Run (or resume) the selection of ``config.select`` into ``output_dir``.

    The selected records are in ``<output_dir>/selection_<method>/selected.jsonl``.
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ForgetlessError(f"output {output} exists and is not a directory")
    # Surface data mistakes before any model time is spent.
    SelectionData.load(config)
    if config.select.method in GRADIENT_METHODS:
        load_anchor(config)
    runs = RunDirectory(output, on_event=on_event or (lambda event, info: None))
    return runs.run_all(selection_stages(config, progress))


def selected_records(selection_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(selection_dir) / SELECTED_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_row(record: Record) -> dict[str, Any]:
    row = dataclasses.asdict(record)
    row.pop("meta", None)
    return row
