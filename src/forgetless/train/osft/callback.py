"""OSFT as a ``transformers`` callback: builds the bases at the start of training and projects
after every optimizer step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from forgetless.errors import ForgetlessError
from forgetless.train.config import OsftConfig
from forgetless.train.osft.projector import OrthogonalSubspaceProjector
from forgetless.train.osft.ranks import (
    choose_ranks,
    layer_importance,
    target_modules,
)
from forgetless.train.osft.sharding import (
    broadcast_,
    is_distributed,
    is_main_process,
    refuse_sharded_launch,
    refuse_unsupported_sharding,
    row_block,
)
from forgetless.train.osft.subspace import SubspaceBasis, full_svd


class OsftCallback(TrainerCallback):
    """Drop-in OSFT for any ``transformers.Trainer`` (or TRL ``SFTTrainer``).

    Build it from the model *before* training starts (and before resuming a checkpoint: the
    subspaces must come from the starting weights): it chooses the ranks, takes the SVDs and,
    with ``freeze_untargeted``, freezes the other parameters so the Trainer's optimizer skips
    them. ``calibration`` is an iterable of model-input batches (``input_ids`` etc.) from the
    prior data, needed by the adaptive rank policy.

    Under FSDP2 it can be built from the sharded model (``fully_shard`` applied first; every
    process must build it, as it gathers each matrix once) or from the whole model that the
    Trainer (accelerate) shards afterwards; either way each process keeps only its rows of the
    left factors once training begins.
    """

    def __init__(
        self,
        model: nn.Module,
        config: OsftConfig | None = None,
        calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
        *,
        verbose: bool = True,
    ):
        config = config or OsftConfig()
        refuse_unsupported_sharding(model)
        modules = target_modules(model, config.target_modules)
        if config.rank_policy == "adaptive" and calibration is None:
            raise ForgetlessError(
                "adaptive OSFT ranks need calibration batches of the prior data "
                "(or use osft.rank_policy=fixed)"
            )
        importance, svds = None, {}
        if config.rank_policy == "adaptive":
            if config.importance == "matrix":  # the hooks rotate each output by its SVD
                svds = {name: full_svd(module.weight) for name, module in modules.items()}
            # Forward passes only: under FSDP2 every process runs the same calibration batches.
            importance = layer_importance(model, modules, calibration, config.importance, svds)
            importance = _same_on_every_process(importance)
        choices = choose_ranks(modules, config, importance)
        bases = {}
        # One matrix at a time: a sharded matrix is gathered, decomposed and cut down to this
        # process's rows before the next, so only one whole matrix is held at once.
        for choice in tqdm(choices, desc="OSFT: SVD of target matrices", leave=False):
            weight = modules[choice.name].weight
            svd = svds.pop(choice.name, None) or full_svd(weight)
            basis = SubspaceBasis(weight, choice.rank, config.projection, svd)
            if is_distributed():
                # Every process must project onto the same subspaces; SVDs of equal weights are
                # not guaranteed to return bitwise-equal bases across processes.
                broadcast_(basis.left)
                broadcast_(basis.right)
            block = row_block(choice.name, weight)
            bases[choice.name] = basis.shard_rows_(*block) if block else basis
        if config.freeze_untargeted:
            targeted = {id(module.weight) for module in modules.values()}
            for param in model.parameters():
                param.requires_grad_(id(param) in targeted)
        self.projector = OrthogonalSubspaceProjector(modules, choices, bases)
        self.config = config
        if verbose and is_main_process():
            print("OSFT preserved (frozen) rank per matrix:\n" + self.projector.rank_table())

    @property
    def ranks(self) -> list[dict]:
        return [asdict(choice) for choice in self.projector.choices]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_launch(args)
        if model is not None:
            refuse_unsupported_sharding(model)
        # After the Trainer (accelerate) has sharded the model, if it does: from here on each
        # process keeps only its rows of the left factors.
        self.projector.bind()
        # After a resumed checkpoint is loaded: its weights were re-projected before saving.
        self.projector.take_reference()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.config.project_gradients:
            self.projector.project_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector.pending_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer saves, evaluates and stops right after this hook.
        due = state.global_step % self.config.reproject_every == 0
        if due or control.should_save or control.should_evaluate or control.should_training_stop:
            self.projector.reproject()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate:
            self.projector.reproject()

    def on_train_end(self, args, state, control, **kwargs):
        self.projector.reproject()
        self.projector.release_reference()


def _same_on_every_process(importance: dict[str, float]) -> dict[str, float]:
    if not is_distributed():
        return importance
    values = torch.tensor(list(importance.values()), dtype=torch.float64)
    broadcast_(values)
    return dict(zip(importance, values.tolist(), strict=True))
