"""Per-tensor merge rules: how N expert deltas of one tensor become one merged delta.

A merge method (:mod:`forgetless.merge.rules`) names a sparsifier, a rescaling and a
consensus rule; this module holds the components' tensor code. Each rule pulls the experts'
deltas one at a time instead of taking a stack of N tensors (mergekit stacks them), so memory
holds a constant number of tensors whatever the number of experts.

Random masks are independent (a Bernoulli draw per expert) or disjoint: one uniform draw per
entry, shared by the experts, of which each expert owns an interval [offset, offset + keep),
so no entry is kept by two experts. Each expert regenerates the shared draw from its seed
rather than the merge holding N masks, so memory does not grow with N either way.

Per-expert weights multiply the masked, rescaled deltas before the consensus, as in mergekit.

The meter sees, per expert, the delta δ_t and then the *masked* delta m_t ⊙ δ_t (random mask
for sotu/dare, top-magnitude trim for ties, the delta itself for task arithmetic), from
which the diagnostics compute collision rates and cosines.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

import torch

from forgetless.merge.config import MergeConfig
from forgetless.merge.rules import merge_rule

DeltaSource = Callable[[int], torch.Tensor]


class OverlapObserver(Protocol):
    def observe_raw(self, expert: int, delta: torch.Tensor) -> None: ...

    def observe_masked(self, expert: int, masked: torch.Tensor) -> None: ...


def mask_seed(seed: int, expert: int, key: str) -> int:
    """A seed per (merge seed, expert, tensor): masks do not depend on the order tensors are
    visited in, and adding an expert leaves the others' masks unchanged."""
    return _seed(f"{seed}/{expert}/{key}")


def partition_seed(seed: int, key: str) -> int:
    """The seed of the draw that disjoint masks share: per (merge seed, tensor), no expert."""
    return _seed(f"{seed}/disjoint/{key}")


def _seed(text: str) -> int:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _uniform(shape: torch.Size, seed: int) -> torch.Tensor:
    # Drawn on the CPU generator so the same seed gives the same bits on any machine.
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def random_mask(shape: torch.Size, keep: float, seed: int) -> torch.Tensor:
    return _uniform(shape, seed) < keep


def disjoint_mask(shape: torch.Size, keeps: list[float], expert: int, seed: int) -> torch.Tensor:
    """Expert ``expert``'s share of a partition: the entries whose shared uniform draw (seeded
    by ``seed``, the same for every expert) falls in [offset, offset + its keep)."""
    # Expert e's interval starts where e - 1's ends, computed by the same additions, so
    # neighbouring intervals share their boundary exactly and never overlap.
    low = [0.0, *accumulate(keeps)][expert]
    draw = _uniform(shape, seed)
    return (draw >= low) & (draw < low + keeps[expert])


def top_magnitude_mask(delta: torch.Tensor, keep: float) -> torch.Tensor:
    if keep >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    kept = max(1, math.ceil(keep * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - kept + 1).values
    return delta.abs() >= threshold


Sparsifier = Callable[[torch.Tensor, float, int], torch.Tensor]
# (masked delta of expert i, on demand, number of experts) -> the merged delta
Consensus = Callable[["MaskedDeltas", int], torch.Tensor]

# Masks of the registered sparsifiers: (delta, keep, seed) -> which entries survive.
SPARSIFIERS: dict[str, Sparsifier | None] = {
    "none": None,
    "random": lambda delta, keep, seed: random_mask(delta.shape, keep, seed),
    "magnitude": lambda delta, keep, seed: top_magnitude_mask(delta, keep),
}


@dataclass
class MaskedDeltas:
    """Expert i's delta of one tensor, masked, rescaled and weighted, made when a consensus
    rule calls ``masked(i)`` (possibly twice per expert); ``weights`` are there for rules
    that weigh the experts beyond their deltas (TIES' weighted mean)."""

    key: str
    delta: DeltaSource
    config: MergeConfig
    keeps: list[float]
    weights: list[float]
    meter: OverlapObserver
    observed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._sparsify = SPARSIFIERS[merge_rule(self.config.method).sparsifier]
        self._rescale = self.config.rescales()

    def __call__(self, expert: int) -> torch.Tensor:
        # Masked in place; the meter sees each expert once even when a rule reads it twice.
        values = self.delta(expert)
        first = expert not in self.observed
        self.observed.add(expert)
        if first:
            self.meter.observe_raw(expert, values)
        mask = self._mask(values, expert)
        if mask is not None:
            values.mul_(mask)
        if first:
            self.meter.observe_masked(expert, values)
        if self._rescale:
            values.div_(self.keeps[expert])
        # Skipped at weight 1, the default: a full pass over the tensor that changes nothing.
        if self.weights[expert] != 1.0:
            values.mul_(self.weights[expert])
        return values

    def _mask(self, values: torch.Tensor, expert: int) -> torch.Tensor | None:
        seed = self.config.seed
        if self.config.masks == "disjoint":  # the config allows it for random masks only
            return disjoint_mask(values.shape, self.keeps, expert, partition_seed(seed, self.key))
        if self._sparsify is None:
            return None
        return self._sparsify(values, self.keeps[expert], mask_seed(seed, expert, self.key))


def _sum(masked: MaskedDeltas, experts: int) -> torch.Tensor:
    total: torch.Tensor | None = None
    for expert in range(experts):
        # Besides the accumulator, one masked delta is ever alive.
        delta = masked(expert)
        total = delta if total is None else total.add_(delta)
        del delta
    assert total is not None
    return total


def _sign_elect(masked: MaskedDeltas, experts: int) -> torch.Tensor:
    """TIES: the sign of the summed (weighted) masked deltas wins; entries agreeing with it
    are averaged, weighted as in mergekit: Σ agreeing w·δ / Σ agreeing w. Two passes over the
    experts, so each delta is read twice: more reading, same memory."""
    elected = _sum(masked, experts).sign_()
    total = torch.zeros_like(elected)
    agreeing = torch.zeros_like(elected)
    for expert in range(experts):
        delta = masked(expert)
        agrees = (torch.sign(delta) == elected) & (delta != 0)
        total.add_(delta.mul_(agrees))
        agreeing.add_(agrees, alpha=masked.weights[expert])
        del delta, agrees
    # Entries no expert agrees on are 0 in total already; dividing them by 1 keeps them so.
    return total.div_(agreeing.masked_fill_(agreeing == 0, 1.0))


CONSENSUS: dict[str, Consensus] = {"sum": _sum, "sign_elect": _sign_elect}


def merge_tensor(
    key: str, delta: DeltaSource, experts: int, config: MergeConfig, meter: OverlapObserver
) -> torch.Tensor:
    """The merged delta of tensor ``key`` (fp32, before ``config.scale``)."""
    weights = config.expert_weights(experts)
    masked = MaskedDeltas(key, delta, config, config.expert_keeps(experts), weights, meter)
    consensus = merge_rule(config.method).consensus
    merged = CONSENSUS[consensus](masked, experts)
    # Sign election already divides by the agreeing experts' weights; only a sum can grow.
    if config.normalize and consensus == "sum":
        merged.div_(sum(weights))
    return merged
