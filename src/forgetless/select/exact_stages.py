"""The stages of exact mean-direction costs (``forgetless.select.exact``):

    exact_directions (g_ref and g_V in full) -> exact_pool (each candidate's exact products)

They read the same pool, anchor and validation records as the sketched gradient stages and
none of their files, so they can run beside them in one run directory; their settings leave
out the projection, so every projection dimension and seed shares them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings
from forgetless.select.config import AnchorConfig, GradientConfig
from forgetless.select.data import PoolSettings, load_anchor
from forgetless.select.stages import PoolGradientSettings, Selection, load_feature_model

ANCHOR_MEAN_FILE = "anchor_mean.safetensors"
TARGET_FILE = "validation_direction.safetensors"


class ExactDirectionsSettings(StageSettings):
    model: ModelConfig
    anchor: AnchorConfig
    pool: PoolSettings
    gradient: GradientConfig


class ExactDirectionsStage(Stage):
    def __init__(self, selection: Selection):
        self.selection, self.name = selection, "exact_directions"
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


class ExactPoolStage(Stage):
    def __init__(self, selection: Selection):
        self.selection, self.name = selection, "exact_pool"
        self.depends_on = ("exact_directions", *selection.upstream)

    def settings(self) -> PoolGradientSettings:
        from forgetless.select.exact import exact_settings

        return PoolGradientSettings(
            pool=self.selection.pool,
            gradient=exact_settings(self.selection.select.gradient),
            role="pool",
            featured_samples=None,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.io import load_tensors
        from forgetless.select.exact import ReferenceProducts
        from forgetless.select.gradients import extract_gradient_features

        started = time.perf_counter()
        selection = self.selection
        loaded = load_feature_model(selection, None)
        device = next(loaded.model.parameters()).device
        folder = inputs["exact_directions"].directory
        references = [
            load_tensors(folder / name, device) for name in (ANCHOR_MEAN_FILE, TARGET_FILE)
        ]
        features = extract_gradient_features(
            loaded.model,
            loaded.tokenizer,
            selection.data(inputs).candidates,
            self.settings().gradient,
            workdir,
            progress=selection.progress,
            description=self.name,
            projector=ReferenceProducts(references, device),
        )
        return {
            "samples": len(features.ids),
            "usable": int(features.valid.sum()),
            "seconds": time.perf_counter() - started,
        }


def exact_stages(selection: Selection) -> list[Stage]:
    return [ExactDirectionsStage(selection), ExactPoolStage(selection)]


def exact_pool_cosines(
    results: dict[str, StageResult],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alignment, utility, usable) of every candidate, from finished exact stages."""
    from forgetless.select.exact import exact_cosines
    from forgetless.select.gradients import load_gradient_features

    features = load_gradient_features(results["exact_pool"].directory)
    norms = results["exact_directions"].summary
    alignment, utility = exact_cosines(features, norms["anchor_norm"], norms["target_norm"])
    return alignment, utility, features.valid
