"""The criterion test's arms, as a stage whose few kilobytes an archive keeps.

The criterion test (``scripts/ogs_criterion.py``) reads a pool's gradient features for three
things only: each record's cost and utility, the subsets it builds from them, and what each
subset is predicted to cost. The features themselves are large (3,000 records at d = 131,072
take 0.7 GB), so an archive keeps their stages as records only, and a run directory lost with
its machine would need their hour of gradients again before a single arm could train. This
stage reduces them to those numbers (``arms.json``): archived in full, it lets a rerun
anywhere rebuild the same subsets and train the arms left without computing a gradient.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.io import write_json_atomic
from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings
from forgetless.select.criterion import (
    matched_arms,
    predict,
    random_subsets,
    sample_criterion,
    utility_strata,
)
from forgetless.select.stages import Selection, feature_inputs, pool_scores

ARMS_FILE = "arms.json"
POOL_STAGE = "gradients_pool"


class ArmsSettings(StageSettings):
    """How the subsets are drawn; the pool, its gradients and the cost are the inputs'."""

    tokenizer: ModelConfig  # whose tokens the arms are matched on
    max_length: int  # training's, which cuts the records' tokens
    fraction: float  # each subset's share of the usable pool's tokens
    strata: int  # utility strata the low, high and random arms are matched over
    subsets: int  # random subsets for the regression
    seed: int


def draw_subsets(
    cost: np.ndarray, utility: np.ndarray, tokens: np.ndarray, settings: ArmsSettings
) -> dict[str, np.ndarray]:
    """The matched low, high and random arms and the random subsets ``subset00``, ...: sorted
    positions in the given (usable) records, each holding ``fraction`` of their tokens."""
    arms = matched_arms(
        cost,
        utility_strata(utility, settings.strata),
        tokens,
        settings.fraction,
        np.random.default_rng([settings.seed, 0]),
    )
    draws = random_subsets(
        tokens,
        settings.fraction * tokens.sum(),
        settings.subsets,
        np.random.default_rng([settings.seed, 1]),
    )
    return {**arms, **{f"subset{i:02d}": indices for i, indices in enumerate(draws)}}


class CriterionArmsStage(Stage):
    """Every record's cost (``select.cost``), utility and training tokens, the subsets drawn
    from them (indices into the pool's candidates) and each subset's predictions."""

    name = "criterion_arms"

    def __init__(self, selection: Selection, settings: ArmsSettings):
        if selection.select.gradient.projector == "exact":
            raise ValueError("the criterion's arms are drawn from sketched features")
        self.selection, self.arms = selection, settings
        self.depends_on = feature_inputs(selection, POOL_STAGE)

    def settings(self) -> ArmsSettings:
        return self.arms

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.data.features import training_tokens
        from forgetless.models import load_tokenizer
        from forgetless.select.gradients import load_gradient_features

        select = self.selection.select
        scores, valid, anchor = pool_scores(select, inputs, POOL_STAGE)
        usable = np.flatnonzero(valid)
        gradients = load_gradient_features(inputs[POOL_STAGE].directory).dense()[usable]
        cost = sample_criterion(gradients, anchor, select.cost)
        utility = scores.utility[usable]
        if not (np.isfinite(cost).all() and np.isfinite(utility).all()):
            raise ForgetlessError("a usable record's cost or utility is not finite")
        records = self.selection.data(inputs).candidates
        model = self.arms.tokenizer
        tokenizer = load_tokenizer(model.name, model.trust_remote_code, model.revision)
        tokens = training_tokens(tokenizer, records, self.arms.max_length)
        subsets = {}
        for name, positions in draw_subsets(cost, utility, tokens[usable], self.arms).items():
            predicted = predict(gradients, anchor, cost, positions)
            subsets[name] = {"indices": usable[positions].tolist(), "predicted": asdict(predicted)}
        gradient_seconds = sum(inputs[name].seconds or 0.0 for name in self.depends_on)
        write_json_atomic(
            workdir / ARMS_FILE,
            {
                "candidates": len(records),
                "usable": usable.tolist(),
                "cost": cost.tolist(),
                "utility": utility.tolist(),
                "tokens": tokens.tolist(),
                "subsets": subsets,
                "gradient_seconds": gradient_seconds,
            },
        )
        return {"usable": len(usable), "subsets": len(subsets)}
