"""The projector that applies every targeted matrix's projection after each optimizer step
(and, optionally, to the gradients before it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from forgetless.errors import ForgetlessError
from forgetless.train.osft.ranks import RankChoice, format_rank_table
from forgetless.train.osft.sharding import local_part, row_block
from forgetless.train.osft.subspace import SubspaceBasis


class OrthogonalSubspaceProjector:
    """Holds the bases of all targeted matrices and applies the projections.

    The weights are looked up on their modules at every use, not kept: FSDP2 (and accelerate
    preparing it) replaces each parameter by a sharded one after the callback is built. Under
    FSDP2 a basis keeps only this process's rows of its left factor (:meth:`bind`), the
    projections act on the local blocks of the gradients and weights, and the reference
    weights of the re-projection are local blocks too.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        choices: Iterable[RankChoice],
        bases: Mapping[str, SubspaceBasis],
    ):
        self.modules = dict(modules)
        self.choices = list(choices)
        self.bases = dict(bases)
        self._reference: dict[str, torch.Tensor] = {}
        self._bound = False
        self.pending_steps = 0

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {name: module.weight for name, module in self.modules.items()}

    def bind(self) -> None:
        """Match each basis to how its weight is held now: keep only the local rows of the left
        factor of a row-sharded weight, and move the factors to the weight's device."""
        for name, weight in self.weights.items():
            basis = self.bases[name]
            block = row_block(name, weight)
            if block is None and tuple(weight.shape) != basis.shape:
                raise ForgetlessError(
                    f"OSFT: {name} is not a whole {basis.shape[0]}x{basis.shape[1]} matrix here "
                    f"(shape {tuple(weight.shape)}); only DDP and FSDP2 are supported"
                )
            if block is not None and basis.rows is None:
                basis.shard_rows_(*block)
            elif block is not None and basis.rows != block[:2]:
                raise ForgetlessError(
                    f"OSFT: {name} moved from rows {basis.rows} to {block[:2]} of this process "
                    "after its basis was sharded"
                )
            basis.to(local_part(weight).device)
        self._bound = True

    @torch.no_grad()
    def project_gradients(self) -> None:
        if not self._bound:
            self.bind()
        for name, weight in self.weights.items():
            if weight.grad is None:
                continue
            grad = local_part(weight.grad)
            work = grad if grad.dtype == torch.float32 else grad.float()
            self.bases[name].project_(work)
            if work is not grad:
                grad.copy_(work)

    @torch.no_grad()
    def take_reference(self) -> None:
        """Remember the weights (which satisfy the constraint) as the origin of the drift."""
        if not self._bound:
            self.bind()
        self._reference = {
            name: local_part(weight).detach().float().clone()
            for name, weight in self.weights.items()
        }
        self.pending_steps = 0

    @torch.no_grad()
    def reproject(self) -> None:
        """``W ← W_ref + P(W − W_ref)`` for every matrix stepped since the last call.

        Projecting the drift rather than W itself keeps the fp32 round-off relative to the
        drift, not to the (much larger) weights.
        """
        if not self.pending_steps:
            return
        for name, reference in self._reference.items():
            weight = local_part(self.modules[name].weight)
            drift = weight.detach().float() - reference
            self.bases[name].project_(drift)
            reference.add_(drift)
            weight.copy_(reference)
        self.pending_steps = 0

    def release_reference(self) -> None:
        self._reference = {}

    def rank_table(self) -> str:
        return format_rank_table(self.choices, next(iter(self.bases.values())).projection)
