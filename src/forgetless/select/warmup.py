"""What the LoRA warm-up leaves for the gradient features: the adapter, its Adam moments, and
with ``select.gradient.checkpoints`` > 1 the same at evenly spaced steps with each segment's
mean learning rate, as LESS computes features at several checkpoints.

LESS (Xia et al., 2024) scores a sample at every checkpoint and sums the cosines weighted by
the mean learning rate of the epoch that checkpoint closes. We store, per sample, the
concatenation of each checkpoint's unit gradient times sqrt(w_k / sum w): the cosine of two
such vectors is exactly that weighted mean of per-checkpoint cosines, so the anchor geometry
(``forgetless.select.metrics``) applies to it unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from forgetless.io import save_tensors, write_json_atomic
from forgetless.shards import ShardedRows, load_sharded_rows, release_pages

MOMENTS_FILE = "adam_moments.safetensors"
CHECKPOINT_DIR = "checkpoint_{}"
WEIGHT_FILE = "learning_rate.json"


def adam_moments(model, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's Adam moments by parameter name, and its betas."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    names = {id(param): name for name, param in model.named_parameters()}
    tensors = {}
    for group in inner.param_groups:
        for param in group["params"]:
            moments = inner.state.get(param, {})
            if "exp_avg" in moments:
                name = names[id(param)]
                tensors[f"{name}:exp_avg"] = moments["exp_avg"]
                tensors[f"{name}:exp_avg_sq"] = moments["exp_avg_sq"]
    tensors["betas"] = torch.tensor(inner.param_groups[0]["betas"], dtype=torch.float64)
    return tensors


class AdamMomentsCallback(TrainerCallback):
    """Keeps the warm-up's Adam moments when training ends."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        save_tensors(self.path, adam_moments(model, optimizer))


def checkpoint_steps(total: int, checkpoints: int) -> list[int]:
    """``checkpoints`` evenly spaced steps of a ``total``-step warm-up, the last at its end."""
    # ceil of steps spaced at least one apart: distinct, increasing, the last = total.
    return [math.ceil(total * k / checkpoints) for k in range(1, checkpoints + 1)]


class WarmupCheckpoints(TrainerCallback):
    """Saves the adapter and Adam moments at the given steps, each with the mean learning
    rate of the steps since the previous one (its weight)."""

    def __init__(self, directory: Path, steps: list[int]):
        self.directory, self.steps = directory, steps
        self.rates: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        # The rate this step uses (the scheduler steps after the optimizer).
        self.rates.append(float(optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step not in self.steps:
            return
        folder = self.directory / CHECKPOINT_DIR.format(self.steps.index(state.global_step) + 1)
        model.save_pretrained(str(folder / "adapter"))
        save_tensors(folder / MOMENTS_FILE, adam_moments(model, optimizer))
        weight = float(np.mean(self.rates))
        write_json_atomic(folder / WEIGHT_FILE, {"step": state.global_step, "weight": weight})
        self.rates = []


def combine_checkpoints(parts: list[Path], weights: list[float], output: Path, ids) -> None:
    """The weighted concatenation of the checkpoints' features (module doc), written as one
    feature folder with the last checkpoint's loss, norm and token columns."""
    share = np.sqrt(np.asarray(weights, dtype=np.float64) / float(np.sum(weights)))
    loaded = [load_sharded_rows(part) for part in parts]
    width = sum(matrix.shape[1] for _, matrix, _ in loaded)
    _, _, columns = loaded[-1]
    store = ShardedRows(
        output,
        ids,
        identity={"checkpoints": [str(part.name) for part in parts], "weights": list(weights)},
        shard_size=max(1, len(ids)),
        width=width,
        dtype=np.float16,
        columns={name: values.dtype for name, values in columns.items()},
    )
    block = 4096
    for start in range(0, len(ids), block):
        pieces = []
        for scale, (_, matrix, _) in zip(share, loaded, strict=True):
            rows = np.asarray(matrix[start : start + block], dtype=np.float32)
            release_pages(matrix)
            norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            pieces.append(scale * rows / norms)
        store.matrix[start : start + block] = np.concatenate(pieces, axis=1).astype(np.float16)
    for name, values in columns.items():
        store.columns[name][:] = values
    store.commit(0)
