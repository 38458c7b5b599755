"""OSFT: full fine-tuning constrained away from each matrix's top singular subspace
("Sculpting Subspaces", arXiv 2504.07097), with adaptive per-matrix ranks.

For every targeted weight ``W = U S Vᵀ`` the top-k singular directions are frozen, in one of
two senses (``osft.projection``), with ``P`` the projection an update ``ΔW`` must satisfy
``ΔW = P(ΔW)`` for:

* ``two_sided``: ``P(X) = (I − U_high U_highᵀ) X (I − V_high V_highᵀ)``, i.e. ``U_highᵀ ΔW = 0``
  and ``ΔW V_high = 0``;
* ``top_block``: ``P(X) = X − U_high U_highᵀ X V_high V_highᵀ``, i.e. only
  ``U_highᵀ ΔW V_high = 0`` (the top-k singular values and their couplings stay fixed).

Why not PEFT's OSF tuner: it re-parameterises W into trainable U/S/V factors and rebuilds W in
every forward, which doubles the step time and keeps full U, S, V per matrix. Here the weights
stay dense and the forward is unchanged; only the projection bases are stored, and the
projections run per optimizer step (never per micro-batch):

1. the optimizer's step is projected: every ``osft.reproject_every`` steps (default: every
   step), and always before a checkpoint, an evaluation and the end of training, the drift
   since the last re-projection is projected, ``W ← W_ref + P(W − W_ref)``; AdamW's
   element-wise scaling and decoupled weight decay would otherwise move the weights into the
   frozen subspace even along a projected gradient;
2. with ``osft.project_gradients`` (default false) the gradient is projected before every
   step too, so the optimizer's moments live in the allowed subspace, at twice the
   projection cost (and the drift may then be re-projected less often).

Neither transformers, PEFT nor accelerate offers step-level projection of dense weights, so
this module is written by hand; it plugs into any ``transformers.Trainer`` as a callback.

Distributed training: under DDP every process holds the whole matrices and projects them
identically. Under FSDP2 (``fully_shard``; accelerate's ``fsdp_version: 2``) each matrix and its
gradient are DTensors sharded by rows, and each process projects only its own row block: it
keeps the matching rows of the left factor and the whole right factor, and the one product that
spans all rows (``leftᵀ X``) is all-reduced, a matrix with as many rows as the stored left
factor has columns (see :func:`projection_communication`). FSDP1 and DeepSpeed are refused.
"""

from forgetless.train.osft.callback import OsftCallback
from forgetless.train.osft.projector import OrthogonalSubspaceProjector
from forgetless.train.osft.ranks import (
    RankChoice,
    calibration_batches,
    choose_ranks,
    enclosing_block,
    format_rank_table,
    layer_importance,
    matched_lora_rank,
    preserved_ratios,
    target_modules,
)
from forgetless.train.osft.sharding import refuse_sharded_launch
from forgetless.train.osft.subspace import (
    SubspaceBasis,
    projection_communication,
    projection_cost,
    thin_svd,
    trainable_directions,
)

__all__ = [
    "OrthogonalSubspaceProjector",
    "OsftCallback",
    "RankChoice",
    "SubspaceBasis",
    "calibration_batches",
    "choose_ranks",
    "enclosing_block",
    "format_rank_table",
    "layer_importance",
    "matched_lora_rank",
    "preserved_ratios",
    "projection_communication",
    "projection_cost",
    "refuse_sharded_launch",
    "target_modules",
    "thin_svd",
    "trainable_directions",
]
