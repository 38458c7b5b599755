"""Per-tensor merge rules: how N expert deltas of one tensor become one merged delta.

Each rule pulls the experts' deltas one at a time through ``delta(t)`` instead of taking a
stack of N tensors (mergekit stacks them), so memory holds a constant number of tensors
whatever the number of experts. TIES needs two passes (sign election, then the disjoint mean),
so it reads each delta twice: more reading, same memory.

Every rule shows the meter, per expert, the delta δ_t and then the *masked* delta m_t ⊙ δ_t
(random mask for sotu/dare, top-magnitude trim for ties, the delta itself for task
arithmetic), from which the diagnostics compute collision rates and cosines.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Protocol

import torch

from forgetless.config import MergeConfig

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


def merge_tensor(
    key: str, delta: DeltaSource, experts: int, config: MergeConfig, meter: OverlapObserver
) -> torch.Tensor:
    """The merged delta of tensor ``key`` (fp32, before ``config.scale``)."""
    if config.method == "ties":
        return _ties(delta, experts, config.keep, meter)
    total: torch.Tensor | None = None
    for expert in range(experts):
        # Masked in place: besides the accumulator, one delta and one mask are ever alive.
        masked = delta(expert)
        meter.observe_raw(expert, masked)
        if config.method != "task_arithmetic":
            masked.mul_(random_mask(masked.shape, config.keep, mask_seed(config.seed, expert, key)))
        meter.observe_masked(expert, masked)
        if config.rescales():
            masked.div_(config.keep)
        total = masked if total is None else total.add_(masked)
        del masked
    assert total is not None
    return total


def _ties(delta: DeltaSource, experts: int, keep: float, meter: OverlapObserver) -> torch.Tensor:
    sign_mass: torch.Tensor | None = None
    for expert in range(experts):
        trimmed = delta(expert)
        meter.observe_raw(expert, trimmed)
        trimmed.mul_(top_magnitude_mask(trimmed, keep))
        meter.observe_masked(expert, trimmed)
        sign_mass = trimmed if sign_mass is None else sign_mass.add_(trimmed)
        del trimmed
    assert sign_mass is not None
    elected = sign_mass.sign_()
    total = torch.zeros_like(elected)
    agreeing = torch.zeros_like(elected)
    for expert in range(experts):
        trimmed = delta(expert)
        trimmed.mul_(top_magnitude_mask(trimmed, keep))
        agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
        total.add_(trimmed.mul_(agrees))
        agreeing.add_(agrees)
        del trimmed, agrees
    return total.div_(agreeing.clamp_(min=1))
