"""Per-tensor merge rules: how N expert deltas of one tensor become one merged delta.

A merge method (:mod:`forgetless.merge.rules`) names a sparsifier, a rescaling and a
consensus rule; this module holds the components' tensor code. Each rule pulls the experts'
deltas one at a time instead of taking a stack of N tensors (mergekit stacks them), so memory
holds a constant number of tensors whatever the number of experts.

The meter sees, per expert, the delta δ_t and then the *masked* delta m_t ⊙ δ_t (random mask
for sotu/dare, top-magnitude trim for ties, the delta itself for task arithmetic), from
which the diagnostics compute collision rates and cosines.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
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
    digest = hashlib.sha256(f"{seed}/{expert}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_mask(shape: torch.Size, keep: float, seed: int) -> torch.Tensor:
    # Drawn on the CPU generator so the same seed gives the same bits on any machine.
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < keep


def top_magnitude_mask(delta: torch.Tensor, keep: float) -> torch.Tensor:
    if keep >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    kept = max(1, math.ceil(keep * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - kept + 1).values
    return delta.abs() >= threshold


Sparsifier = Callable[[torch.Tensor, float, int], torch.Tensor]
# (masked delta of expert i, on demand, number of experts) -> the merged delta
Consensus = Callable[[Callable[[int], torch.Tensor], int], torch.Tensor]

# Masks of the registered sparsifiers: (delta, keep, seed) -> which entries survive.
SPARSIFIERS: dict[str, Sparsifier | None] = {
    "none": None,
    "random": lambda delta, keep, seed: random_mask(delta.shape, keep, seed),
    "magnitude": lambda delta, keep, seed: top_magnitude_mask(delta, keep),
}


def _sum(masked: Callable[[int], torch.Tensor], experts: int) -> torch.Tensor:
    total: torch.Tensor | None = None
    for expert in range(experts):
        # Besides the accumulator, one masked delta is ever alive.
        delta = masked(expert)
        total = delta if total is None else total.add_(delta)
        del delta
    assert total is not None
    return total


def _sign_elect(masked: Callable[[int], torch.Tensor], experts: int) -> torch.Tensor:
    """TIES: the sign of the summed masked deltas wins; entries agreeing with it are averaged.
    Two passes over the experts, so each delta is read twice: more reading, same memory."""
    elected = _sum(masked, experts).sign_()
    total = torch.zeros_like(elected)
    agreeing = torch.zeros_like(elected)
    for expert in range(experts):
        delta = masked(expert)
        agrees = (torch.sign(delta) == elected) & (delta != 0)
        total.add_(delta.mul_(agrees))
        agreeing.add_(agrees)
        del delta, agrees
    return total.div_(agreeing.clamp_(min=1))


CONSENSUS: dict[str, Consensus] = {"sum": _sum, "sign_elect": _sign_elect}


def merge_tensor(
    key: str, delta: DeltaSource, experts: int, config: MergeConfig, meter: OverlapObserver
) -> torch.Tensor:
    """The merged delta of tensor ``key`` (fp32, before ``config.scale``)."""
    rule = merge_rule(config.method)
    sparsify = SPARSIFIERS[rule.sparsifier]
    rescale = config.rescales()
    observed: set[int] = set()

    def masked(expert: int) -> torch.Tensor:
        # Masked in place; the meter sees each expert once even when a rule reads it twice.
        values = delta(expert)
        first = expert not in observed
        observed.add(expert)
        if first:
            meter.observe_raw(expert, values)
        if sparsify is not None:
            values.mul_(sparsify(values, config.keep, mask_seed(config.seed, expert, key)))
        if first:
            meter.observe_masked(expert, values)
        if rescale:
            values.div_(config.keep)
        return values

    return CONSENSUS[rule.consensus](masked, experts)
