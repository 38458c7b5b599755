"""Exact cosines of per-sample gradients with the two directions the mean-direction costs need.

A d-dimensional sketch estimates cos(g_i, g_ref) with an error of order 1/sqrt(d), and on a
pool whose true costs lie close together that error dominates: at d = 131072 the criterion
test's cost agrees with itself across two projection seeds at a Spearman of only 0.56
(docs/select.md, "How reliable is the cost?"). The costs that look at one direction at a
time need no sketch: the conflict and alignment with the anchor's mean gradient g_ref and the
utility towards the validation direction g_V are inner products with two fixed vectors, and
both vectors fit in memory in full. Each is a weighted sum of per-sample gradients, which an
ordinary backward pass accumulates in the weights' ``.grad``; each pool sample's per-layer
gradient is then formed as the random projector forms it and multiplied with them, so the
cosines are exact for about the price of a sketch.

The price is memory, two float32 copies of the featured weights (0.4 GB each for SmolLM2-135M's
blocks, 28 GB for Llama-3-8B's), and scope: OGS's energy cost needs the anchor subspace,
which has no such form, so it stays sketched. No library computes this (Opacus's per-sample
gradients and LESS/LoGra's projections both materialise or sketch every sample), hence the
few lines here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.select.config import GradientConfig
from forgetless.select.gradients import (
    GradientFeatures,
    extract_gradient_features,
    flat_per_sample,
    gradient_modules,
    length_sorted_batches,
    per_sample_losses,
)
from forgetless.select.metrics import EPS, SampleScores

Direction = dict[str, torch.Tensor]  # featured layer -> its flattened weight (and bias) part


def exact_settings(gradient: GradientConfig) -> GradientConfig:
    """The gradient settings exact products depend on (no projection, no preconditioning)."""
    if gradient.parameters == "lora":
        raise ForgetlessError(
            "exact costs take the gradients of the model's own weights: set "
            "select.gradient.parameters to blocks or last_blocks"
        )
    kept = gradient.model_dump(
        include={"parameters", "last_blocks", "batch_size", "max_length", "shard_size"}
    )
    return GradientConfig(**kept, preconditioner="none")


class ReferenceProducts:
    """The projector of ``extract_gradient_features`` whose columns are full-size directions:
    a sample's features are its gradient's exact inner products with them, its norm exact."""

    dtype = np.float32  # exact values, kept so

    def __init__(self, references: Sequence[Direction], device: torch.device):
        names = list(references[0])
        self.dim = len(references)
        self.references = {
            name: torch.stack([reference[name].float() for reference in references]).to(device)
            for name in names
        }
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode())
            digest.update(self.references[name].cpu().numpy().tobytes())
        self.identity = digest.hexdigest()

    def add_into(
        self, total: torch.Tensor, name: str, x, grad, has_bias: bool, precondition=None
    ) -> torch.Tensor:
        per_sample = flat_per_sample(x, grad, has_bias)
        if precondition is not None:
            per_sample = precondition(name, per_sample)
        total += per_sample @ self.references[name].T
        return per_sample.pow(2).sum(1)


def summed_gradient(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    settings: GradientConfig,
    weights: np.ndarray,
    *,
    progress: bool = True,
    description: str = "gradient sum",
) -> tuple[Direction, int]:
    """(sum_i weights[i] * (gradient of record i's mean token loss), the number of records
    with a target token, which are the only ones that have a gradient): per featured layer
    in the layout of ``flat_per_sample``, accumulated in float32 from ordinary backward
    passes (in eval mode, as the per-sample features are)."""
    modules = gradient_modules(model, settings.parameters, settings.last_blocks)
    device = next(model.parameters()).device
    trained = {
        name: [p for p in (module.weight, module.bias) if p is not None]
        for name, module in modules.items()
    }
    requires = {name: param.requires_grad for name, param in model.named_parameters()}
    was_training = model.training
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    for params in trained.values():
        for param in params:
            param.requires_grad_(True)
            param.grad = None
    total = {
        name: torch.zeros(sum(p.numel() for p in params), device=device)
        for name, params in trained.items()
    }
    scale = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)
    batches = length_sorted_batches(
        tokenizer, records, range(len(records)), settings.max_length, settings.batch_size, device
    )
    bar = tqdm(total=len(records), desc=description, disable=not progress, unit="sample")
    used = 0
    try:
        for batch, ids, mask, labels in batches:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss, _ = per_sample_losses(logits, labels)
            (loss * scale[batch]).sum().backward()
            for name, params in trained.items():
                total[name] += torch.cat([p.grad.float().reshape(-1) for p in params])
                for param in params:
                    param.grad = None
            used += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        for name, param in model.named_parameters():
            param.requires_grad_(requires[name])
            param.grad = None
        model.train(was_training)
    return total, used


def exact_directions(
    model: nn.Module,
    tokenizer,
    anchor: Sequence[Record],
    validation: Sequence[Record],
    settings: GradientConfig,
    workdir: Path,
    *,
    progress: bool = True,
) -> tuple[Direction, Direction]:
    """(g_ref, g_V) in full: the mean gradient of the usable anchor records (as
    ``anchor_from_gradients`` takes it from sketches) and the mean unit gradient of the
    usable validation records (as ``domain_direction`` does). The validation records' exact
    norms, which the unit gradients need, come from one featuring pass into ``workdir``."""
    anchor_sum, anchor_usable = summed_gradient(
        model, tokenizer, anchor, settings, np.ones(len(anchor)), progress=progress,
        description="anchor mean",
    )  # fmt: skip
    if anchor_usable == 0:
        raise ForgetlessError(
            "no usable anchor gradients: the anchor data is empty or every sample's prompt "
            "fills select.gradient.max_length"
        )
    anchor_mean = {name: part / anchor_usable for name, part in anchor_sum.items()}
    device = next(model.parameters()).device
    norms = extract_gradient_features(
        model,
        tokenizer,
        validation,
        settings,
        workdir,
        progress=progress,
        description="validation norms",
        projector=ReferenceProducts([anchor_mean], device),
    )
    if not norms.valid.any():
        raise ForgetlessError(
            "no usable validation gradients: the validation data is empty or every sample's "
            "prompt fills select.gradient.max_length"
        )
    unit = np.where(norms.valid, 1.0 / np.maximum(norms.norm, EPS), 0.0) / norms.valid.sum()
    target, _ = summed_gradient(
        model, tokenizer, validation, settings, unit, progress=progress, description="g_V"
    )
    return anchor_mean, target


def direction_norm(direction: Direction) -> float:
    return float(sum(part.double().pow(2).sum() for part in direction.values()) ** 0.5)


def exact_scores(
    features: GradientFeatures, anchor_norm: float, target_norm: float
) -> SampleScores:
    """The per-sample scores of features made with ``ReferenceProducts([g_ref, g_V])``:
    utility cos(g_i, g_V), alignment cos(g_i, g_ref) and the length of g_i along g_ref, all
    exact, and no orthogonality (it needs the anchor subspace). 0 for a sample without a
    gradient."""
    products = np.asarray(features.vectors, dtype=np.float64)
    norms = np.maximum(features.norm.astype(np.float64), EPS)
    component = products[:, 0] / max(anchor_norm, EPS)
    scores = SampleScores(
        utility=products[:, 1] / (norms * max(target_norm, EPS)),
        orthogonality=None,
        alignment=component / norms,
        anchor_component=component,
    )
    if not all(np.isfinite(part).all() for part in (scores.utility, component)):
        raise ForgetlessError("non-finite exact cosines: a gradient overflowed")
    return scores
