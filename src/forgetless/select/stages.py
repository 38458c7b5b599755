"""Selection runs: the stages from pool to selected subset, cached in a run directory.

    warmup (lora only) -> gradients_{anchor,validation,pool|featured} -> [navigator_inputs
    -> navigator] (ogs only) -> selection_<method>

With ``select.gradient.projector=exact`` the gradient stages are exact_directions (g_ref and
g_V in full) -> exact_{pool|featured} (each candidate's exact products with them).

The pool is the data section (or records an upstream stage wrote, in a recipe). Unless a
validation set is given, ``select.validation.samples`` records are held out of the pool
(seeded) and never selected. ``ogs`` featurises only a seeded ``featured_samples`` part of
the pool with gradients (stage ``gradients_featured``); the other gradient methods featurise
all of it (``gradients_pool``). Every method has its own selection stage, so several methods
share one run directory and its gradients.

Each stage's settings are built from whole config sections (the pool's, the gradient
features', the anchor's, ...), so a stage is recomputed exactly when something it reads
changes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.data.config import DataConfig
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_file, write_json_atomic
from forgetless.model_config import ModelConfig
from forgetless.registry import lookup
from forgetless.runs import (
    Stage,
    StageResult,
    StageSettings,
    records_file,
    run_directory,
)
from forgetless.select import methods as _methods  # noqa: F401  (registers the methods)
from forgetless.select.config import (
    AnchorConfig,
    GradientConfig,
    NavigatorInputsConfig,
    SelectConfig,
)
from forgetless.select.data import PoolSettings, SelectionData, load_anchor
from forgetless.select.report import SELECTED_FILE, write_selection
from forgetless.train.config import TrainConfig


class Selection:
    """One selection's settings and where its data comes from (shared by its stages)."""

    def __init__(
        self,
        model: ModelConfig,
        data: DataConfig | None,
        select: SelectConfig,
        *,
        pool_from: str | None = None,
        data_dir: str | None = None,
        progress: bool = True,
    ):
        if (data is None) == (pool_from is None):
            raise ValueError("give the pool as a data section or as an upstream stage, not both")
        self.model, self.select = model, select
        self.pool = PoolSettings(
            model=model, data=data, validation=select.validation, seed=select.seed
        )
        self.pool_from, self.data_dir, self.progress = pool_from, data_dir, progress
        self.method = lookup("select", select.method).implementation

    @property
    def upstream(self) -> tuple[str, ...]:
        return (self.pool_from,) if self.pool_from else ()

    def data(self, inputs: dict[str, StageResult]) -> SelectionData:
        featured = self.select.featured_samples if self.method.navigator else None
        pool = None if self.pool_from is None else records_file(inputs[self.pool_from])
        return SelectionData.load(
            self.pool, pool=pool, featured_samples=featured, data_dir=self.data_dir
        )

    def pool_role(self) -> str:
        """ogs featurises part of the pool; a stage of its own keeps the whole pool's
        gradients (used by less and orthogonal) cached beside it. A pool no larger than
        ``featured_samples`` is featurised whole, and shares the others' stage."""
        if not self.method.navigator:
            return "pool"
        if self.pool_from is None:
            data = self.data({})
            if len(data.featured) == len(data.candidates):
                return "pool"
        return "featured"


class WarmupSettings(StageSettings):
    pool: PoolSettings
    train: TrainConfig
    checkpoints: int


class WarmupStage(Stage):
    """Train the LoRA adapter whose gradients are the features (LESS's warm-up)."""

    name = "warmup"

    def __init__(self, selection: Selection):
        self.selection = selection
        self.depends_on = selection.upstream

    def settings(self) -> WarmupSettings:
        # The adapter trains on the pool only: the anchor, the method and the projection of
        # the gradients taken under it do not change it.
        return WarmupSettings(
            pool=self.selection.pool,
            train=self.training(),
            checkpoints=self.selection.select.gradient.checkpoints,
        )

    def training(self) -> TrainConfig:
        gradient = self.selection.select.gradient
        return TrainConfig(
            method="lora",
            learning_rate=gradient.warmup_learning_rate,
            max_steps=gradient.warmup_steps,
            batch_size=gradient.batch_size,
            max_length=gradient.max_length,
            lr_scheduler="linear",
            seed=self.selection.select.seed,
            save_steps=max(1, gradient.warmup_steps),
            lora={
                "r": gradient.lora_r,
                "alpha": gradient.lora_alpha,
                "dropout": 0.0,
                "target_modules": gradient.lora_target_modules,
            },
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.models import load_configured_model
        from forgetless.select.warmup import (
            MOMENTS_FILE,
            AdamMomentsCallback,
            WarmupCheckpoints,
            checkpoint_steps,
        )
        from forgetless.train.sft import train_model

        started = time.perf_counter()
        gradient = self.selection.select.gradient
        data = self.selection.data(inputs)
        train = self.training()
        callbacks = [AdamMomentsCallback(workdir / MOMENTS_FILE)]
        if gradient.checkpoints > 1:
            steps = checkpoint_steps(gradient.warmup_steps, gradient.checkpoints)
            callbacks.append(WarmupCheckpoints(workdir, steps))
        loaded = load_configured_model(self.selection.model, for_training=True)
        _, result = train_model(
            loaded.model, loaded.tokenizer, data.candidates, train, workdir, callbacks=callbacks
        )
        # Only the adapter is needed; the merged model and the resume checkpoints are not.
        shutil.rmtree(workdir / "model", ignore_errors=True)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        summary = {
            "adapter_dir": "adapter",
            "adam_moments": MOMENTS_FILE,
            "warmup": result.to_dict(),
        }
        return {**summary, "seconds": time.perf_counter() - started}


def load_feature_model(selection: Selection, adapter: Path | None):
    """The model whose gradients are features: the base, plus a warm-up adapter for lora."""
    from forgetless.models import load_configured_model

    loaded = load_configured_model(selection.model, for_training=True)
    if adapter is not None:
        from peft import PeftModel

        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter), is_trainable=True)
    return loaded


class AnchorGradientSettings(StageSettings):
    model: ModelConfig
    anchor: AnchorConfig
    gradient: GradientConfig
    seed: int


class PoolGradientSettings(StageSettings):
    pool: PoolSettings
    gradient: GradientConfig
    role: str
    featured_samples: int | None


class GradientStage(Stage):
    within_last_blocks: int | None = None  # PartialGradientStage's restriction

    def __init__(self, selection: Selection, role: str):
        self.selection, self.role = selection, role
        self.name = f"gradients_{role}"
        warmup = ("warmup",) if selection.select.gradient.parameters == "lora" else ()
        self.depends_on = warmup if role == "anchor" else (*warmup, *selection.upstream)

    def settings(self) -> AnchorGradientSettings | PoolGradientSettings:
        select = self.selection.select
        if self.role == "anchor":
            return AnchorGradientSettings(
                model=self.selection.model, anchor=select.anchor, gradient=select.gradient,
                seed=select.seed,
            )  # fmt: skip
        return PoolGradientSettings(
            pool=self.selection.pool,
            gradient=select.gradient,
            role=self.role,
            featured_samples=select.featured_samples if self.role == "featured" else None,
        )

    def records(self, inputs: dict[str, StageResult]) -> list[Record]:
        if self.role == "anchor":
            return load_anchor(self.selection.select.anchor, self.selection.data_dir)
        data = self.selection.data(inputs)
        if self.role == "validation":
            return data.validation
        if self.role == "featured":
            return [data.candidates[i] for i in data.featured]
        return data.candidates

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.gradients import load_gradient_features
        from forgetless.select.warmup import CHECKPOINT_DIR, WEIGHT_FILE, combine_checkpoints

        started = time.perf_counter()
        records = self.records(inputs)
        gradient = self.selection.select.gradient
        if gradient.parameters != "lora":
            features = self._extract(records, None, workdir)
        elif gradient.checkpoints == 1:
            features = self._extract(records, inputs["warmup"].directory, workdir)
        else:
            # LESS's checkpoints: each one's features, then their weighted combination.
            folders = [
                inputs["warmup"].directory / CHECKPOINT_DIR.format(k)
                for k in range(1, gradient.checkpoints + 1)
            ]
            parts = [workdir / folder.name for folder in folders]
            for folder, part in zip(folders, parts, strict=True):
                last = self._extract(records, folder, part)
            weights = [json.loads((f / WEIGHT_FILE).read_text())["weight"] for f in folders]
            combine_checkpoints(parts, weights, workdir, last.ids)
            features = load_gradient_features(workdir)
        return {
            "samples": len(features.ids),
            "usable": int(features.valid.sum()),
            "seconds": time.perf_counter() - started,
        }

    def _extract(self, records: list[Record], warmup: Path | None, output: Path):
        """Features under the warm-up in ``warmup`` (its adapter, and its Adam state when
        this stage's gradients are preconditioned: the pool's, as in LESS, never the
        anchor's or validation's)."""
        from forgetless.io import load_tensors
        from forgetless.select.gradients import extract_gradient_features
        from forgetless.select.warmup import MOMENTS_FILE

        select = self.selection.select
        loaded = load_feature_model(self.selection, None if warmup is None else warmup / "adapter")
        moments = None
        preconditioned = select.gradient.preconditioner == "adam"
        if warmup is not None and preconditioned and self.role not in ("anchor", "validation"):
            moments = load_tensors(warmup / MOMENTS_FILE)
        return extract_gradient_features(
            loaded.model,
            loaded.tokenizer,
            records,
            select.gradient,
            output,
            seed=select.seed,
            progress=self.selection.progress,
            description=self.name,
            adam_moments=moments,
            within_last_blocks=self.within_last_blocks,
        )


class PartialGradientSettings(StageSettings):
    features: AnchorGradientSettings | PoolGradientSettings
    within_last_blocks: int


class PartialGradientStage(GradientStage):
    """The part of a role's gradient features that the featured layers of the last ``blocks``
    transformer blocks contribute (same warm-up, projection and preconditioning), from a
    forward pass and the backward of those blocks only: how much of the exact geometry a
    cheap partial backward carries (``scripts/navigator_signal.py``)."""

    def __init__(self, selection: Selection, role: str, blocks: int):
        super().__init__(selection, role)
        self.within_last_blocks = blocks
        self.name = f"gradients_{role}_last{blocks}"

    def settings(self) -> PartialGradientSettings:
        return PartialGradientSettings(
            features=super().settings(), within_last_blocks=self.within_last_blocks
        )


ANCHOR_MEAN_FILE = "anchor_mean.safetensors"
TARGET_FILE = "validation_direction.safetensors"


class ExactDirectionsSettings(StageSettings):
    model: ModelConfig
    anchor: AnchorConfig
    pool: PoolSettings
    gradient: GradientConfig


class ExactDirectionsStage(Stage):
    """g_ref and g_V in full, for exact costs (``forgetless.select.exact``). Its settings
    leave out the projection, so every projection dimension and seed shares it."""

    name = "exact_directions"

    def __init__(self, selection: Selection):
        self.selection = selection
        self.depends_on = selection.upstream

    def settings(self) -> ExactDirectionsSettings:
        from forgetless.select.exact import exact_settings

        select = self.selection.select
        return ExactDirectionsSettings(
            model=self.selection.model,
            anchor=select.anchor,
            pool=self.selection.pool,
            gradient=exact_settings(select.gradient),
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.io import save_tensors
        from forgetless.select.exact import direction_norm, exact_directions

        started = time.perf_counter()
        selection = self.selection
        loaded = load_feature_model(selection, None)
        anchor_mean, target = exact_directions(
            loaded.model,
            loaded.tokenizer,
            load_anchor(selection.select.anchor, selection.data_dir),
            selection.data(inputs).validation,
            self.settings().gradient,
            workdir / "validation_norms",
            progress=selection.progress,
        )
        save_tensors(workdir / ANCHOR_MEAN_FILE, anchor_mean)
        save_tensors(workdir / TARGET_FILE, target)
        return {
            "anchor_norm": direction_norm(anchor_mean),
            "target_norm": direction_norm(target),
            "seconds": time.perf_counter() - started,
        }


class ExactGradientStage(GradientStage):
    """Each candidate's exact inner products with g_ref and g_V and its exact gradient norm
    (stage ``exact_<role>``, role pool or featured)."""

    def __init__(self, selection: Selection, role: str):
        super().__init__(selection, role)
        self.name = f"exact_{role}"
        self.depends_on = ("exact_directions", *selection.upstream)

    def settings(self) -> PoolGradientSettings:
        from forgetless.select.exact import exact_settings

        return (
            super()
            .settings()
            .model_copy(update={"gradient": exact_settings(self.selection.select.gradient)})
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.io import load_tensors
        from forgetless.select.exact import ReferenceProducts
        from forgetless.select.gradients import extract_gradient_features

        started = time.perf_counter()
        loaded = load_feature_model(self.selection, None)
        device = next(loaded.model.parameters()).device
        folder = inputs["exact_directions"].directory
        projector = ReferenceProducts(
            [load_tensors(folder / name, device) for name in (ANCHOR_MEAN_FILE, TARGET_FILE)],
            device,
        )
        features = extract_gradient_features(
            loaded.model,
            loaded.tokenizer,
            self.records(inputs),
            self.settings().gradient,
            workdir,
            progress=self.selection.progress,
            description=self.name,
            projector=projector,
        )
        return {
            "samples": len(features.ids),
            "usable": int(features.valid.sum()),
            "seconds": time.perf_counter() - started,
        }


class NavigatorInputsSettings(StageSettings):
    pool: PoolSettings
    inputs: NavigatorInputsConfig
    max_length: int  # of the base model's per-sample loss (the gradient features' length)
    # The head_gradient geometry's anchor subspace (None when that input is off).
    anchor: AnchorConfig | None
    anchor_rank: int | None


class NavigatorInputsStage(Stage):
    """Forward-only features of every candidate: embedding, log length, base-model loss and
    the output-layer gradient sketch's geometry."""

    name = "navigator_inputs"

    def __init__(self, selection: Selection):
        self.selection = selection
        self.depends_on = selection.upstream

    def settings(self) -> NavigatorInputsSettings:
        select = self.selection.select
        head = "head_gradient" in select.navigator.inputs.features
        return NavigatorInputsSettings(
            pool=self.selection.pool,
            inputs=select.navigator.inputs,
            max_length=select.gradient.max_length,
            anchor=select.anchor if head else None,
            anchor_rank=select.anchor_rank if head else None,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.inputs import navigator_inputs

        started = time.perf_counter()
        select = self.selection.select
        data = self.selection.data(inputs)
        head = "head_gradient" in select.navigator.inputs.features
        matrix, columns = navigator_inputs(
            data.candidates,
            self.selection.model,
            select,
            anchor=load_anchor(select.anchor, self.selection.data_dir) if head else (),
            validation=data.validation,
            progress=self.selection.progress,
        )
        with atomic_file(workdir / "inputs.npy", "wb") as out:
            np.save(out, matrix)
        write_json_atomic(workdir / "columns.json", columns)
        return {
            "samples": len(matrix),
            "columns": len(columns),
            "seconds": time.perf_counter() - started,
        }


def pool_scores(
    select: SelectConfig,
    inputs: dict[str, StageResult],
    pool_stage: str,
    columns: slice = slice(None),
):
    """Per-sample utility/orthogonality/conflict of the featured pool, and the anchor (None,
    and no orthogonality, where the features are exact products).

    ``columns`` scores from part of the projected features only: each column is an
    independent random projection, so two disjoint parts are two smaller projections of the
    same gradients (what the projection alone adds to a score's noise)."""
    from forgetless.select.gradients import load_gradient_features
    from forgetless.select.metrics import anchor_from_gradients, domain_direction, score_samples

    if select.gradient.projector == "exact":
        from forgetless.select.exact import exact_scores

        pool = load_gradient_features(inputs[pool_stage].directory)
        norms = inputs["exact_directions"].summary
        return exact_scores(pool, norms["anchor_norm"], norms["target_norm"]), pool.valid, None

    def features(role: str):
        return load_gradient_features(inputs[f"gradients_{role}"].directory)

    anchor_features = features("anchor")
    validation_features = features("validation")
    anchor = anchor_from_gradients(
        anchor_features.dense()[anchor_features.valid][:, columns], select.anchor_rank
    )
    target = domain_direction(validation_features.dense()[validation_features.valid][:, columns])
    pool = load_gradient_features(inputs[pool_stage].directory)
    return score_samples(pool.dense()[:, columns], anchor, target), pool.valid, anchor


class SelectionSettings(StageSettings):
    pool: PoolSettings
    select: SelectConfig


NAVIGATOR_SCORES = "scores.npy"


class NavigatorStage(Stage):
    """Train the Navigator and score the pool.

    The exact score of a gradient-featured sample is its Lagrangian u - lam * c at the
    multiplier of the exact constrained choice (the ``orthogonal`` method's) on the featured
    samples. Cross-validation reports how well the Navigator ranks samples it did not train
    on, and maps its logits onto the exact score's scale (least squares on the out-of-fold
    logits). The pool's scores (``scores.npy``) are the exact scores where they were computed
    and the mapped logits elsewhere, so gradients are never thrown away.
    """

    name = "navigator"

    def __init__(self, selection: Selection, pool_stage: str):
        self.selection, self.pool_stage = selection, pool_stage
        self.depends_on = (
            *feature_inputs(selection, pool_stage),
            "navigator_inputs",
            *selection.upstream,
        )

    def settings(self) -> SelectionSettings:
        return SelectionSettings(pool=self.selection.pool, select=self.selection.select)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        import torch

        from forgetless.select.metrics import exact_choice
        from forgetless.select.navigator import (
            cross_validate,
            log_as_dicts,
            top_k_quality,
            train_navigator,
            warn_without_signal,
        )

        started = time.perf_counter()
        select = self.selection.select
        data = self.selection.data(inputs)
        scores, valid, _ = pool_scores(select, inputs, self.pool_stage)
        pool_inputs = np.load(inputs["navigator_inputs"].directory / "inputs.npy")
        featured = np.asarray(data.featured)[valid]
        cost = scores.cost(select.cost)[valid]
        utility = scores.utility[valid]
        features = pool_inputs[featured]
        choice = exact_choice(
            utility, cost, select.budget, select.cost_limit, select.cost_limit_basis
        )
        lam, limit = choice.multiplier, choice.limit
        exact = utility - lam * cost

        summary: dict[str, Any] = {
            "cost_limit": limit,
            "exact_multiplier": lam,
            "cost_limit_met": choice.limit_met,
        }
        folds = min(select.navigator.folds, len(featured) // 2)
        navigator, log = train_navigator(
            features,
            utility,
            cost,
            select.navigator,
            budget=select.budget,
            cost_limit=limit,
            seed=select.seed,
            progress=self.selection.progress,
        )
        if folds >= 2:
            summary["cross_validation"], calibration_logits, fold_navigators = cross_validate(
                features,
                utility,
                cost,
                exact,
                select.navigator,
                budget=select.budget,
                cost_limit=limit,
                folds=folds,
                seed=select.seed,
                progress=self.selection.progress,
            )
            # Cross-fitting: the pool is scored by the fold Navigators, whose out-of-fold
            # logits map theirs onto the exact score's scale.
            pool_logits = np.mean([fold.score(pool_inputs) for fold in fold_navigators], axis=0)
            warn_without_signal(summary["cross_validation"], len(pool_inputs) - len(data.featured))
        else:
            calibration_logits = navigator.score(features)
            pool_logits = navigator.score(pool_inputs)
        slope, intercept = np.polyfit(calibration_logits.astype(np.float64), exact, 1)
        pool_score = slope * pool_logits.astype(np.float64) + intercept
        pool_score[featured] = exact
        # Featured samples with nothing to learn (no gradient) rank last.
        pool_score[np.asarray(data.featured)[~valid]] = pool_score.min() - 1.0
        with atomic_file(workdir / "navigator.pt", "wb") as out:
            torch.save(navigator.state_dict(), out)
        with atomic_file(workdir / NAVIGATOR_SCORES, "wb") as out:
            np.save(out, pool_score)
        write_json_atomic(workdir / "log.json", log_as_dicts(log))
        logits = navigator.score(features)
        summary.update(
            trained_on=int(len(featured)),
            final=log_as_dicts(log[-1:])[0],
            calibration={"slope": float(slope), "intercept": float(intercept)},
            navigator_top_in_sample=top_k_quality(logits, utility, cost, select.budget),
            pool_mean={"utility": float(utility.mean()), "cost": float(cost.mean())},
            seconds=time.perf_counter() - started,
        )
        return summary


class SelectionStage(Stage):
    def __init__(self, selection: Selection, pool_stage: str):
        self.selection, self.pool_stage = selection, pool_stage
        method = selection.method
        # One stage per method, so that the methods can share one run directory (and its
        # gradients) and be compared side by side.
        self.name = f"selection_{selection.select.method}"
        depends: tuple[str, ...] = ()
        if method.gradients:
            depends = feature_inputs(selection, pool_stage)
        if method.navigator:
            depends += ("navigator_inputs", "navigator")
        self.depends_on = (*depends, *selection.upstream)

    def settings(self) -> SelectionSettings:
        return SelectionSettings(pool=self.selection.pool, select=self.selection.select)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.select.criterion import fill
        from forgetless.select.methods import RankingInputs
        from forgetless.select.metrics import allowed_cost

        select = self.selection.select
        method = self.selection.method
        data = self.selection.data(inputs)
        tokens = candidate_tokens(self.selection, data.candidates)
        k = data.budget_count(select.budget)
        if select.budget_tokens is not None:
            k = max(1, min(len(tokens), round(select.budget_tokens / float(tokens.mean()))))
        ranking_inputs = RankingInputs(count=len(data.candidates), k=k, seed=select.seed)
        scores = valid = None
        if method.gradients:
            scores, valid, anchor = pool_scores(select, inputs, self.pool_stage)
            cost = scores.cost(select.cost)
            ranking_inputs.utility, ranking_inputs.cost, ranking_inputs.valid = (
                scores.utility,
                cost,
                valid,
            )
            ranking_inputs.cost_limit = allowed_cost(
                scores.utility[valid], cost[valid], k, select.cost_limit, select.cost_limit_basis
            )
            ranking_inputs.extra["cost_limit"] = ranking_inputs.cost_limit
            if anchor is not None:
                ranking_inputs.extra["anchor_energy_captured"] = anchor.captured
        if method.navigator:
            ranking_inputs.navigator_logits = lambda: self._navigator_logits(inputs)
        ranking, ranked_scores = method.rank(ranking_inputs)
        if method.budgeted:
            if select.budget_tokens is None:
                kept = k
            else:
                kept = len(fill(ranking, tokens, select.budget_tokens))
            ranking, ranked_scores = ranking[:kept], ranked_scores[:kept]
        ranking_inputs.extra["tokens"] = int(tokens[ranking].sum())
        return write_selection(
            workdir, select, data, ranking, ranked_scores, scores, valid, ranking_inputs.extra
        )

    def _navigator_logits(self, inputs: dict[str, StageResult]) -> np.ndarray:
        return np.load(inputs["navigator"].directory / NAVIGATOR_SCORES)


def candidate_tokens(selection: Selection, records: list[Record]) -> np.ndarray:
    """What each record adds to training, as a token budget counts it."""
    from forgetless.data.features import training_tokens
    from forgetless.models import load_tokenizer

    model = selection.model
    tokenizer = load_tokenizer(model.name, model.trust_remote_code, model.revision)
    return training_tokens(tokenizer, records, selection.select.gradient.max_length)


def selection_stages(selection: Selection) -> list[Stage]:
    """The stages of one selection, in order; the last is ``selection_<method>``."""
    method = selection.method
    features = feature_stages(selection, selection.pool_role())
    pool_stage = features[-1].name
    stages: list[Stage] = features if method.gradients else []
    if method.navigator:
        stages += [NavigatorInputsStage(selection), NavigatorStage(selection, pool_stage)]
    stages.append(SelectionStage(selection, pool_stage))
    return stages


def feature_stages(selection: Selection, role: str) -> list[Stage]:
    """The stages that featurise the ``role`` part of the pool (pool or featured) and what
    its scores need besides: the warm-up (a LoRA's gradients only) and the anchor's and the
    validation's sketched gradients, or with ``projector=exact`` the two full directions.
    The last is the pool's."""
    if selection.select.gradient.projector == "exact":
        return [ExactDirectionsStage(selection), ExactGradientStage(selection, role)]
    warmup = [WarmupStage(selection)] if selection.select.gradient.parameters == "lora" else []
    return [*warmup, *(GradientStage(selection, name) for name in ("anchor", "validation", role))]


def feature_inputs(selection: Selection, pool_stage: str) -> tuple[str, ...]:
    """The feature stages that ``pool_scores`` reads for ``pool_stage``."""
    if selection.select.gradient.projector == "exact":
        return ("exact_directions", pool_stage)
    return ("gradients_anchor", "gradients_validation", pool_stage)


def gradient_stages(selection: Selection) -> list[Stage]:
    """The feature stages of the whole pool, choosing nothing: what an analysis of the pool's
    gradient geometry reads (``scripts/ogs_criterion.py``). They are the stages of ``less``
    and ``orthogonal``, so a run directory shares them with those selections."""
    return feature_stages(selection, "pool")


def run_selection(config, output_dir: str | Path, *, progress: bool = True, on_event=None):
    """Run (or resume) the selection of ``config.select`` over ``config.data`` into
    ``output_dir``; the selected records are in ``<output_dir>/selection_<method>/selected.jsonl``.
    """
    selection = Selection(
        config.model, config.data, config.select, data_dir=config.data_dir, progress=progress
    )
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ForgetlessError(f"output {output} exists and is not a directory")
    # Surface data mistakes before any model time is spent.
    selection.data({})
    if selection.method.gradients:
        load_anchor(config.select.anchor, config.data_dir)
    return run_directory(output, config, on_event).run_all(selection_stages(selection))


__all__ = [
    "SELECTED_FILE",
    "Selection",
    "candidate_tokens",
    "gradient_stages",
    "pool_scores",
    "run_selection",
    "selection_stages",
]
