"""A closed-form class-incremental classifier on the features of a frozen (merged) backbone.

SoTU (arXiv 2411.02813) merges the per-task deltas into one backbone and classifies with the
head of RanPAC (arXiv 2307.02251): a fixed random projection with ReLU, then ridge regression
onto one-hot labels. The regression needs only the statistics ``G = sum phi phi^T`` and
``C = sum phi y^T``, which add up task by task, so the head after task t is exactly the head
fitted on the data of tasks 1..t at once, with no old sample kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from forgetless.errors import ForgetlessError
from forgetless.evaluate.multiple_choice import evaluation_mode, model_device, unwrap_model
from forgetless.models import resolve_device

POOLINGS = ("mean", "last")
DEFAULT_RIDGE_GRID = tuple(10.0**exponent for exponent in range(-2, 5))


def extract_features(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    pooling: str = "mean",
    progress: bool = True,
) -> torch.Tensor:
    """Final-layer hidden states pooled to one float32 row per text, in the order of ``texts``.

    ``mean`` averages over the text's tokens; ``last`` takes its last token, the only one that
    has seen the whole text under causal attention. Texts longer than ``max_length`` tokens are
    truncated. Rows are right-padded, so real tokens keep their positions and never attend to
    padding: a text's features do not depend on the batch it lands in. Returns a CPU tensor.
    """
    if pooling not in POOLINGS:
        raise ForgetlessError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if batch_size < 1 or max_length < 1:
        raise ForgetlessError(
            f"batch_size and max_length must be positive, got {batch_size} and {max_length}"
        )
    if not texts:
        raise ForgetlessError("no texts to extract features from")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ForgetlessError(f"text {index} has no tokens to take features from")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = unwrap_model(model)
    device = model_device(model)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]), reverse=True)
    pooled_rows = []
    with (
        evaluation_mode(model),
        tqdm(total=len(order), desc="features", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            batch = [encoded[index] for index in order[start : start + batch_size]]
            lengths = torch.tensor([len(ids) for ids in batch], device=device)
            width = len(batch[0])
            input_ids = torch.tensor(
                [ids + [pad_id] * (width - len(ids)) for ids in batch], device=device
            )
            mask = torch.arange(width, device=device) < lengths[:, None]
            hidden = _final_hidden_states(base, input_ids, mask.long()).float()
            if pooling == "mean":
                summed = hidden.masked_fill(~mask[..., None], 0.0).sum(dim=1)
                pooled = summed / lengths[:, None]
            else:
                pooled = hidden[torch.arange(len(batch), device=device), lengths - 1]
            pooled_rows.append(pooled.cpu())
            bar.update(len(batch))
    sorted_features = torch.cat(pooled_rows)
    features = torch.empty_like(sorted_features)
    features[torch.tensor(order)] = sorted_features
    return features


def _final_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    decoder = model.get_decoder()
    if decoder is not model:
        # The decoder alone skips the projection onto the vocabulary, the costliest layer of a
        # small model.
        hidden = getattr(decoder(**inputs), "last_hidden_state", None)
        if hidden is not None:
            return hidden
    return model(**inputs, output_hidden_states=True).hidden_states[-1]


class RandomProjectionRidge:
    """RanPAC's head: ``phi = relu(h W)`` with a fixed seeded Gaussian ``W``, then ridge
    regression of one-hot labels on ``phi``, refitted in closed form after every task.

    Call :meth:`partial_fit` once per task with that task's features and labels (ints in the
    global class space; new ids widen the head). ``gram`` (M x M) and ``cross`` (M x K) hold
    the float64 sums of ``phi phi^T`` and ``phi y^T`` over everything seen.

    The ridge ``lambda`` is chosen afresh for each task, as RanPAC does, from ``ridge_grid``: a
    seeded ``holdout_fraction`` of the task's samples is held back, the head is solved for every
    candidate from the statistics of all earlier tasks plus the rest of this task, and the
    candidate with the least squared error on the held-back one-hot targets wins; the
    held-back samples are then added too. Unlike RanPAC, which validates a head fitted on the
    current task alone, the candidates see statistics nearly as large as the final solve's, so
    ``lambda`` is tuned at the scale it is used at. The held-back targets cover only the
    current task's classes, as in RanPAC. A one-value grid fixes ``lambda`` and holds nothing
    back.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int = 4096,
        *,
        seed: int = 0,
        ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID,
        holdout_fraction: float = 0.2,
        device: str | torch.device | None = None,
    ) -> None:
        if feature_dim < 1 or projection_dim < 1:
            raise ForgetlessError(
                f"feature_dim and projection_dim must be positive, "
                f"got {feature_dim} and {projection_dim}"
            )
        if not ridge_grid or any(not ridge > 0 for ridge in ridge_grid):
            raise ForgetlessError(f"ridge_grid must be positive numbers, got {list(ridge_grid)}")
        if not 0 < holdout_fraction < 1:
            raise ForgetlessError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        self.feature_dim = feature_dim
        self.ridge_grid = tuple(float(ridge) for ridge in ridge_grid)
        self.holdout_fraction = holdout_fraction
        self.device = torch.device("cpu") if device is None else resolve_device(str(device))
        # Drawn on the CPU so every device gets the same projection. The 1/sqrt(d) scale keeps
        # phi at the features' own scale whatever their width, so one ridge grid serves all
        # backbones.
        self._generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(
            feature_dim, projection_dim, generator=self._generator, dtype=torch.float64
        )
        self._projection = (projection / math.sqrt(feature_dim)).to(self.device)
        self.gram = torch.zeros(
            projection_dim, projection_dim, dtype=torch.float64, device=self.device
        )
        self.cross = torch.zeros(projection_dim, 0, dtype=torch.float64, device=self.device)
        self.ridge = self.ridge_grid[0] if len(self.ridge_grid) == 1 else None
        self._seen: set[int] = set()
        self._weights: torch.Tensor | None = None

    @property
    def classes(self) -> tuple[int, ...]:
        """The class ids seen so far; scores have a column for every id up to the largest."""
        return tuple(sorted(self._seen))

    def partial_fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one task's samples (n x feature_dim features, n integer labels)."""
        phi = self._project(features)
        labels = self._check_labels(labels, len(phi))
        classes = max(self.cross.shape[1], int(labels.max()) + 1)
        self.cross = torch.nn.functional.pad(self.cross, (0, classes - self.cross.shape[1]))
        targets = torch.nn.functional.one_hot(labels, classes).to(torch.float64)
        if len(self.ridge_grid) == 1:
            self._accumulate(phi, targets)
        else:
            held = max(1, round(self.holdout_fraction * len(phi)))
            if held >= len(phi):
                raise ForgetlessError(
                    f"choosing the ridge needs at least 2 samples per task, got {len(phi)}; "
                    "pass a single-value ridge_grid to fix it"
                )
            shuffled = torch.randperm(len(phi), generator=self._generator).to(self.device)
            fit, holdout = shuffled[held:], shuffled[:held]
            self._accumulate(phi[fit], targets[fit])
            self.ridge = self._select_ridge(phi[holdout], targets[holdout])
            self._accumulate(phi[holdout], targets[holdout])
        self._seen.update(labels.tolist())
        self._weights = None

    def save(self, path: str | Path) -> None:
        """Write the accumulated statistics (and RNG state) so a later task can continue."""
        state = {
            "gram": self.gram.cpu(),
            "cross": self.cross.cpu(),
            "ridge": self.ridge,
            "seen": sorted(self._seen),
            "generator": self._generator.get_state(),
        }
        from forgetless.io import atomic_file

        with atomic_file(path, "wb") as out:
            torch.save(state, out)

    def load(self, path: str | Path) -> None:
        """Continue from :meth:`save`'s file, written by a head built with the same arguments."""
        state = torch.load(path, weights_only=True)
        if state["gram"].shape != self.gram.shape:
            raise ForgetlessError(
                f"{path}: saved for projection_dim {state['gram'].shape[0]}, "
                f"not {self.gram.shape[0]}"
            )
        self.gram = state["gram"].to(self.device)
        self.cross = state["cross"].to(self.device)
        self.ridge = state["ridge"]
        self._seen = set(state["seen"])
        self._generator.set_state(state["generator"])
        self._weights = None

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """float32 regression outputs (n x classes) on the CPU; the argmax is the prediction."""
        if self.ridge is None:
            raise ForgetlessError("the classifier has seen no data yet; call partial_fit first")
        phi = self._project(features)
        if self._weights is None:
            self._weights = self._solve(self.ridge)
        return (phi @ self._weights).float().cpu()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted class id of every row, as a CPU LongTensor."""
        return self.scores(features).argmax(dim=1)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ForgetlessError(
                f"expected features of shape (n, {self.feature_dim}), got {tuple(features.shape)}"
            )
        if len(features) == 0:
            raise ForgetlessError("no feature rows given")
        # float64 throughout: each row's phi is then the same whichever batch it comes in, so
        # task-by-task sums equal one joint sum up to round-off.
        features = features.to(device=self.device, dtype=torch.float64)
        return torch.relu(features @ self._projection)

    def _check_labels(self, labels, count: int) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ForgetlessError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.shape != (count,):
            raise ForgetlessError(
                f"expected {count} labels, one per feature row, got shape {tuple(labels.shape)}"
            )
        if int(labels.min()) < 0:
            raise ForgetlessError("labels must be non-negative class ids")
        return labels.to(device=self.device, dtype=torch.long)

    def _accumulate(self, phi: torch.Tensor, targets: torch.Tensor) -> None:
        self.gram += phi.T @ phi
        self.cross += phi.T @ targets

    def _select_ridge(self, phi: torch.Tensor, targets: torch.Tensor) -> float:
        errors = [
            float(((phi @ self._solve(ridge) - targets) ** 2).mean()) for ridge in self.ridge_grid
        ]
        return self.ridge_grid[errors.index(min(errors))]

    def _solve(self, ridge: float) -> torch.Tensor:
        system = self.gram.clone()
        system.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            raise ForgetlessError(
                f"ridge {ridge:g} is too small to solve stably for these features; "
                "drop it from ridge_grid"
            )
        return torch.cholesky_solve(self.cross, factor)
