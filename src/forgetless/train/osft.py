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

from __future__ import annotations

import os
import random
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from forgetless.data.features import build_training_features
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.train.config import OsftConfig

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class RankChoice:
    """The preserved (frozen) rank chosen for one weight matrix, and the importance behind it."""

    name: str
    shape: tuple[int, int]
    rank: int
    importance: float | None


def thin_svd(weight: torch.Tensor) -> Svd:
    """``U, S, Vh`` of ``weight`` in fp32, ``U`` m×r, ``Vh`` r×n with r = min(m, n)."""
    return torch.linalg.svd(weight.detach().float(), full_matrices=False)


def trainable_directions(shape: tuple[int, int], rank: int, projection: str) -> int:
    """Dimension of the subspace of m×n updates that ``projection`` leaves trainable."""
    m, n = shape
    return (m - rank) * (n - rank) if projection == "two_sided" else m * n - rank * rank


def matched_lora_rank(shapes: Sequence[tuple[int, int]], config: OsftConfig, tasks: int) -> int:
    """The LoRA rank whose trainable parameters, r·(m + n) per matrix, come nearest to the
    directions OSFT leaves trainable in the same matrices, averaged over a sequence of
    ``tasks`` (the preserved ratio grows from ``trr`` to ``final_trr``; the adaptive ranks
    spread around each task's ratio, which keeps their mean)."""
    per_rank = sum(m + n for m, n in shapes)
    trainable = 0.0
    for index in range(tasks):
        ratio = config.for_task(index, tasks).trr
        trainable += sum(
            trainable_directions(shape, round(ratio * min(shape)), config.projection)
            for shape in shapes
        )
    return max(1, round(trainable / tasks / per_rank))


def projection_cost(
    shape: tuple[int, int], rank: int, projection: str, left_low: bool, right_low: bool
) -> int:
    """Multiply-adds of one :meth:`SubspaceBasis.project_` with the given stored factors.

    Mirrors the branches of ``project_``: a side stored by its complement (``*_low``, possible
    only where the factor is square) is applied first, so the other side works on the smaller
    m×c or c×n product instead of the whole matrix.
    """
    m, n = shape
    k = rank
    c = min(m, n) - k
    if projection == "two_sided":
        if right_low:
            return 2 * m * n * c + 2 * m * (c if left_low else k) * c
        if left_low:
            return 2 * m * n * c + 2 * n * k * c
        return 4 * m * n * k
    if left_low and right_low:
        return 4 * m * n * c + c * c * (m + n)
    if left_low:
        return 2 * m * n * k + 2 * m * k * c
    if right_low:
        return 2 * m * n * k + 2 * n * k * c
    return 2 * m * n * k + 2 * m * k * k


def projection_communication(
    shape: tuple[int, int], rank: int, projection: str, left_low: bool, right_low: bool
) -> int:
    """Elements all-reduced by one :meth:`SubspaceBasis.project_` of a row-sharded matrix.

    Each branch of ``project_`` has exactly one product over the rows of the matrix,
    ``leftᵀ Y`` with ``Y`` the row-sharded ``X`` or ``X R`` (``R`` the stored right factor), and
    that is the only thing communicated: each process computes its rows' share and the shares
    are summed. Everything else acts row by row. The size is (columns of the stored left
    factor) × (columns of ``Y``):

    * two_sided: ``(k or c) × c`` with the right complement stored (``leftᵀ (X V_low)``),
      else ``(k or c) × n``;
    * top_block: ``k × k`` (``U_highᵀ (X V_high)``), ``c × k`` (left complement), ``k × n``
      (right complement), ``c × n`` (both complements).

    With ``c = min(m, n) − k``. Why not the simpler alternative, all-gathering the m×n gradient
    (or weight drift) on every process and projecting it whole: that moves m·n elements per
    process (times (W − 1)/W), and a ring all-reduce of s elements moves 2·s (times the same),
    so the row-sharded projection sends less whenever ``2·s < m·n``. Since k, c < min(m, n),
    ``k × k`` and ``c × k`` always are; a width-by-n product is when that width is under m/2.
    For the storage :class:`SubspaceBasis` picks (fewest multiply-adds) on SmolLM2-135M, 2·s
    is 0.06 to 0.5 of the all-gather over the whole model at preserved ratios 0.25–0.9, and at
    most 1.27× for one matrix at some ranks (docs/osft.md tabulates it). The all-gather would
    also hold an m×n buffer and repeat the m·n-sized multiply-adds on every process, which
    the row-sharded projection splits between them.
    """
    m, n = shape
    k = rank
    c = min(m, n) - k
    left = c if left_low else k
    if projection == "two_sided":
        return left * (c if right_low else n)
    if left_low and right_low:
        return c * n
    if left_low:
        return c * k
    if right_low:
        return k * n
    return k * k


class SubspaceBasis:
    """The projection ``P`` of one matrix (see the module docstring) from its thin SVD.

    On a side where the SVD factor is square (that side's dimension equals r = min(m, n)),
    ``U_high U_highᵀ = I − U_low U_lowᵀ``, so either ``U_high`` or its complement ``U_low`` can
    be stored; each side stores whichever makes the projection cheapest (fewest multiply-adds,
    :func:`projection_cost`). At high preserved ratios (late tasks of a sequence) that makes
    both memory and flops scale with the trainable rank instead of the frozen one.
    """

    def __init__(
        self, weight: torch.Tensor, rank: int, projection: str = "two_sided", svd: Svd | None = None
    ):
        m, n = weight.shape
        r = min(m, n)
        if not 0 < rank < r:
            raise ValueError(f"preserved rank must be in [1, {r - 1}], got {rank}")
        u, _, vh = svd if svd is not None else thin_svd(weight)
        self.shape = (m, n)
        self.rank = rank
        self.projection = projection
        # Set by shard_rows_: this process's rows of the left factor, and the group summing
        # ``leftᵀ Y`` over the processes holding the other rows.
        self.rows: tuple[int, int] | None = None
        self.group = None
        options = [(left, right) for left in {False, m == r} for right in {False, n == r}]
        self.left_low, self.right_low = min(
            options, key=lambda sides: projection_cost((m, n), rank, projection, *sides)
        )
        self.left = (u[:, rank:] if self.left_low else u[:, :rank]).contiguous()
        self.right = (vh[rank:].mT if self.right_low else vh[:rank].mT).contiguous()

    def shard_rows_(self, start: int, length: int, group) -> SubspaceBasis:
        """Keep only rows ``start:start + length`` of the left factor, for a matrix whose rows
        are sharded across the processes of ``group`` (FSDP2): :meth:`project_` then takes
        this process's rows of ``x`` and sums the one product over all rows in ``group``."""
        self.left = self.left[start : start + length].contiguous()
        self.rows = (start, length)
        self.group = group
        return self

    def project_(self, x: torch.Tensor) -> None:
        """Overwrite the fp32 matrix ``x`` with ``P(x)`` (its rows ``self.rows`` if sharded).

        Every branch has exactly one product over the rows, :meth:`_coefficients`; everything
        else acts row by row, so a row-sharded ``x`` needs one all-reduce
        (:func:`projection_communication`)."""
        left, right = self.left, self.right
        if self.projection == "two_sided":
            if self.right_low:  # x (I − V_high V_highᵀ) = (x V_low) V_lowᵀ
                torch.matmul(self._left_out(x @ right), right.mT, out=x)
            elif self.left_low:
                torch.matmul(left, self._right_out(self._coefficients(x)), out=x)
            else:
                self._right_out(self._left_out(x))
            return
        # top_block: x − Π_L x Π_R with Π the projection onto the frozen (high) directions.
        if self.left_low and self.right_low:
            # Π = I − low lowᵀ on both sides: P(x) = L Lᵀx + (x R − L Lᵀ x R) Rᵀ
            coefficients = self._coefficients(x)
            side = x @ right
            side.addmm_(left, coefficients @ right, alpha=-1.0)
            torch.matmul(left, coefficients, out=x)
            x.addmm_(side, right.mT)
        elif self.left_low:
            side = x @ right
            side.addmm_(left, self._coefficients(side), alpha=-1.0)
            x.addmm_(side, right.mT, alpha=-1.0)
        elif self.right_low:
            side = self._coefficients(x)
            side.addmm_(side @ right, right.mT, alpha=-1.0)
            x.addmm_(left, side, alpha=-1.0)
        else:
            x.addmm_(left @ self._coefficients(x @ right), right.mT, alpha=-1.0)

    def _coefficients(self, y: torch.Tensor) -> torch.Tensor:
        """``leftᵀ y``: the only product over the rows, summed over ``group`` if sharded."""
        product = self.left.mT @ y
        if self.group is not None:
            _all_reduce_(product, self.group)
        return product

    def _left_out(self, y: torch.Tensor) -> torch.Tensor:
        """``(I − U_high U_highᵀ) y``, in place unless the complement is stored."""
        if self.left_low:
            return self.left @ self._coefficients(y)
        return y.addmm_(self.left, self._coefficients(y), alpha=-1.0)

    def _right_out(self, y: torch.Tensor) -> torch.Tensor:
        """``y (I − V_high V_highᵀ)``, in place unless the complement is stored."""
        if self.right_low:
            return (y @ self.right) @ self.right.mT
        return y.addmm_(y @ self.right, self.right.mT, alpha=-1.0)

    def high_energy(self, x: torch.Tensor) -> tuple[float, ...]:
        """Norms of the parts of ``x`` that ``P`` removes: ``(‖U_highᵀ x‖, ‖x V_high‖)`` for
        two_sided, ``(‖U_highᵀ x V_high‖,)`` for top_block (of this process's rows if
        sharded)."""
        x = x.detach().float()
        left = x - self._left_out(x.clone())
        if self.projection == "two_sided":
            return float(left.norm()), float((x - self._right_out(x.clone())).norm())
        return (float((left - self._right_out(left.clone())).norm()),)

    def to(self, device: torch.device) -> SubspaceBasis:
        self.left = self.left.to(device)
        self.right = self.right.to(device)
        return self


def target_modules(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """The linear layers whose qualified names match ``pattern`` (``re.search``)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ForgetlessError(f"osft.target_modules is not a valid regex: {err}") from None
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and regex.search(name)
    }
    if not found:
        raise ForgetlessError(
            f"osft.target_modules {pattern!r} matches no linear layer of "
            f"{type(model).__name__}; set it to a regex over module names"
        )
    return found


def enclosing_block(model: nn.Module, name: str) -> str | None:
    """Name of the repeated block (an element of an ``nn.ModuleList``) containing ``name``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[: end - 1])) if end > 1 else model
        if isinstance(parent, nn.ModuleList) and parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return None


def _cosine_hook(store: dict[str, list[float]], key: str, compare):
    def record(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        a, b = compare(x, y)
        cosine = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        store[key][0] += float(cosine.sum())
        store[key][1] += cosine.numel()

    return record


def _matrix_comparison(module: nn.Linear, svd: Svd):
    u, _, vh = svd

    def compare(x, y):
        if module.bias is not None:
            y = y - module.bias
        # W = Q P with Q = U Vᵀ (orthogonal) and P = V S Vᵀ: Qᵀ y = P x is the output in the
        # input's coordinates, whatever the shapes.
        back = (y.reshape(-1, module.out_features).float() @ u) @ vh
        return x.reshape(-1, module.in_features), back

    return compare


def _block_comparison(x, y):
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


@torch.no_grad()
def layer_importance(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    calibration: Iterable[Mapping[str, torch.Tensor]],
    granularity: str = "block",
    svds: Mapping[str, Svd] | None = None,
) -> dict[str, float]:
    """Importance per targeted matrix: the mean over calibration tokens of a cosine between
    the input and the output of a layer.

    ``block``: the layer is the transformer block holding the matrix, x the residual stream
    entering it, and every matrix of a block shares the block's score. ``matrix``: the layer
    is the matrix itself, x its input and ``y = W x`` its output. The literal ``cos(x, y)``
    compares coordinates that q/k/v/o and the MLP maps do not align (and is undefined when
    W is not square): on SmolLM2 it averages about 0. So ``y`` is first rotated back into the
    input's coordinates by W's own rotation: with the polar decomposition ``W = Q P``
    (``Q = U Vᵀ``, ``P = V S Vᵀ``) the score is ``cos(x, Qᵀ y) = cos(x, P x)``, equal to the
    literal score for a symmetric W. It is high when the inputs lie along W's top singular
    directions. ``svds`` (name -> :func:`thin_svd`) is needed for ``matrix``.
    """
    store: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if granularity == "matrix":
        owners = {name: name for name in modules}
        hooked = {
            name: (module, _matrix_comparison(module, svds[name]))
            for name, module in modules.items()
        }
    else:
        owners = {name: enclosing_block(model, name) for name in modules}
        orphans = [name for name, block in owners.items() if block is None]
        if orphans:
            raise ForgetlessError(
                f"{orphans[0]} is not inside a repeated block; use osft.importance=matrix"
            )
        hooked = {
            block: (model.get_submodule(block), _block_comparison) for block in set(owners.values())
        }
    handles = [
        module.register_forward_hook(_cosine_hook(store, key, compare), with_kwargs=True)
        for key, (module, compare) in hooked.items()
    ]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in calibration:
            model(**{key: value.to(device) for key, value in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not store:
        raise ForgetlessError("OSFT calibration produced no tokens; give it non-empty samples")
    return {name: store[owner][0] / store[owner][1] for name, owner in owners.items()}


def preserved_ratios(importance: Mapping[str, float], config: OsftConfig) -> dict[str, float]:
    """Preserved fraction of min(m, n) per matrix from its importance (``osft.rank_mapping``).

    ``quantile``: the matrices are ordered by importance (ties share their mean position) and
    spaced evenly over ``[trr − h, trr + h]``, ``h = min(trr − mrr, rank_spread · (1 − trr))``:
    the mean is trr, every matrix keeps at least ``(1 − rank_spread)`` of the average trainable
    fraction ``1 − trr``, and however the importances bunch together the ranks spread over
    2h. ``mean``: the paper's ``mrr + I / mean(I) · (trr − mrr)``.
    """
    if config.rank_mapping == "mean":
        mean = statistics.fmean(importance.values())
        if mean <= 0:
            raise ForgetlessError(
                "adaptive OSFT ranks: the mean importance is not positive "
                f"({mean:.3g}); use osft.rank_mapping=quantile or osft.rank_policy=fixed"
            )
        return {
            name: config.mrr + score / mean * (config.trr - config.mrr)
            for name, score in importance.items()
        }
    half_width = min(config.trr - config.mrr, config.rank_spread * (1 - config.trr))
    ordered = sorted(importance.values())
    positions: dict[float, list[int]] = defaultdict(list)
    for position, score in enumerate(ordered):
        positions[score].append(position)
    last = len(ordered) - 1

    def centred(score: float) -> float:  # in [-1, 1], mean 0
        return 2 * statistics.fmean(positions[score]) / last - 1 if last else 0.0

    return {name: config.trr + half_width * centred(score) for name, score in importance.items()}


def choose_ranks(
    modules: Mapping[str, nn.Linear],
    config: OsftConfig,
    importance: Mapping[str, float] | None = None,
) -> list[RankChoice]:
    """Preserved rank per matrix: adaptive (from importance), fixed ratio, or an override."""
    ratios = None
    if config.rank_policy == "adaptive":
        if importance is None:
            raise ForgetlessError("adaptive OSFT ranks need calibration data")
        ratios = preserved_ratios(importance, config)
    overrides = [(re.compile(pattern), value) for pattern, value in config.rank_overrides.items()]
    choices = []
    for name, module in modules.items():
        shape = tuple(module.weight.shape)
        r = min(shape)
        override = next((value for regex, value in overrides if regex.search(name)), None)
        if override is not None:
            wanted = override * r if override < 1 else override
        elif ratios is not None:
            wanted = ratios[name] * r
        else:
            wanted = config.preserve_ratio * r
        # Only the mean mapping, overrides and matrices with a tiny min(m, n) reach the bounds.
        rank = int(min(max(round(wanted), 1), r - 1))
        score = importance.get(name) if importance else None
        choices.append(RankChoice(name=name, shape=shape, rank=rank, importance=score))
    return choices


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_main_process() -> bool:
    if _distributed():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


# How `accelerate launch` asks for sharded training: TrainingArguments' own fields stay empty.
SHARDING_ENVIRONMENT = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
DEEPSPEED_REFUSAL = (
    "OSFT does not support DeepSpeed ZeRO (requested by {}): DeepSpeed's optimizer steps its "
    "own flattened, partitioned master weights and gradients and copies them over the model's, "
    "so a projection of the model's weights is lost at the next step; use FSDP2 "
    "(fsdp_version: 2) or DDP"
)
FSDP1_REFUSAL = (
    "OSFT does not support FSDP1 ({}): its FlatParameter flattens and shards the matrices so "
    "that no process holds a block of rows; use FSDP2 (fsdp_version: 2 in accelerate, or "
    "torch's fully_shard) or DDP"
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def refuse_sharded_launch(args=None) -> None:
    """Refuse DeepSpeed and FSDP1 before any step, however they were requested (FSDP2 and DDP
    are supported).

    DeepSpeed ZeRO (any stage, ZeRO-1 and 2 included, where every process holds the whole
    model) steps fp32 master weights of its own, flattened and partitioned across processes,
    with gradients in its own buffers, then copies them over the model's parameters: the
    projected step written into the parameters would be overwritten by the next one, and the
    gradients are out of reach of the Trainer's ``on_pre_optimizer_step``.
    FSDP1 is recognised from accelerate's environment (``FSDP_VERSION`` unset or 1) and from an
    explicit ``fsdp_config["version"] = 1``; whatever the launch, the callback checks the wrapped
    model and its parameters again when training begins.
    """
    deepspeed = ["ACCELERATE_USE_DEEPSPEED"] if _flag("ACCELERATE_USE_DEEPSPEED") else []
    if args is not None and getattr(args, "deepspeed", None):
        deepspeed.append("TrainingArguments")
    if deepspeed:
        raise ForgetlessError(DEEPSPEED_REFUSAL.format(", ".join(deepspeed)))
    trainer_fsdp = args is not None and getattr(args, "fsdp", None)
    if trainer_fsdp:
        fsdp_config = getattr(args, "fsdp_config", None) or {}
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version"))
        if version is not None and int(version) == 1:
            raise ForgetlessError(FSDP1_REFUSAL.format("fsdp_config version 1"))
    elif _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ForgetlessError(
            FSDP1_REFUSAL.format("requested by ACCELERATE_USE_FSDP without FSDP_VERSION=2")
        )


def _refuse_unsupported_sharding(model: nn.Module) -> None:
    """Refuse FSDP1 and DeepSpeed ZeRO-3 from the model they have wrapped or partitioned."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ForgetlessError(FSDP1_REFUSAL.format("found wrapping the model"))
    for name, param in model.named_parameters():
        if "_flat_param" in name:
            raise ForgetlessError(FSDP1_REFUSAL.format("found wrapping the model"))
        if hasattr(param, "ds_id"):
            raise ForgetlessError(DEEPSPEED_REFUSAL.format("ZeRO-3 partitioned parameters"))


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's block of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _row_block(name: str, weight: torch.Tensor):
    """``(first row, rows, group)`` of this process's block of a DTensor weight sharded by rows
    (FSDP2's ``Shard(0)``, possibly replicated over other mesh dimensions as in HSDP), ``None``
    for a whole tensor. ``group`` is the mesh dimension's process group over which the rows
    are spread."""
    if not _is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, weight.placements
    sharded = [
        dim for dim, placement in enumerate(placements) if not isinstance(placement, Replicate)
    ]
    if not sharded:
        return None
    if len(sharded) > 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim:
        raise ForgetlessError(
            f"OSFT needs {name} whole or sharded by rows over one mesh dimension (FSDP2's "
            f"default), not {tuple(placements)}; use fully_shard without shard_placement_fn "
            "or tensor parallelism"
        )
    dim = sharded[0]
    # Shard(0) splits like torch.chunk: ceil(m / size) rows per process, the last ones fewer
    # (or none); the same rule as compute_local_shape_and_global_offset.
    size, coordinate = mesh.size(dim), mesh.get_local_rank(dim)
    rows = weight.shape[0]
    chunk = -(-rows // size)
    start = min(coordinate * chunk, rows)
    length = min(chunk, rows - start)
    if weight.to_local().shape[0] != length:
        raise ForgetlessError(
            f"OSFT: {name} holds {weight.to_local().shape[0]} rows on this process, not the "
            f"{length} of an even Shard(0) split of {rows} rows over {size} processes"
        )
    return start, length, mesh.get_group(dim)


def _through_accelerator(tensor: torch.Tensor, group=None) -> bool:
    """NCCL takes only GPU tensors: stage a CPU tensor (e.g. under CPU offload) on the GPU."""
    return tensor.device.type == "cpu" and dist.get_backend(group) == "nccl"


def _all_reduce_(tensor: torch.Tensor, group=None) -> None:
    if _through_accelerator(tensor, group):
        staged = tensor.cuda()
        dist.all_reduce(staged, group=group)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, group=group)


def _broadcast_(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` with rank 0's on every process."""
    if _through_accelerator(tensor):
        staged = tensor.cuda()
        dist.broadcast(staged, src=0)
        tensor.copy_(staged)
    else:
        dist.broadcast(tensor, src=0)


def _full_svd(weight: torch.Tensor) -> Svd:
    """:func:`thin_svd` of the whole matrix, gathered once if it is sharded (a collective: every
    process calls this for the same matrices in the same order)."""
    if weight.is_meta:
        raise ForgetlessError(
            "OSFT needs the starting weights on every process when its callback is built, and "
            "this one has placeholders (meta tensors); with accelerate's FSDP, set "
            "cpu_ram_efficient_loading to false"
        )
    return thin_svd(weight.full_tensor() if _is_dtensor(weight) else weight)


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
            block = _row_block(name, weight)
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
            basis.to(_local(weight).device)
        self._bound = True

    @torch.no_grad()
    def project_gradients(self) -> None:
        if not self._bound:
            self.bind()
        for name, weight in self.weights.items():
            if weight.grad is None:
                continue
            grad = _local(weight.grad)
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
            name: _local(weight).detach().float().clone() for name, weight in self.weights.items()
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
            weight = _local(self.modules[name].weight)
            drift = weight.detach().float() - reference
            self.bases[name].project_(drift)
            reference.add_(drift)
            weight.copy_(reference)
        self.pending_steps = 0

    def release_reference(self) -> None:
        self._reference = {}

    def rank_table(self) -> str:
        return format_rank_table(self.choices, next(iter(self.bases.values())).projection)


def format_rank_table(choices: list[RankChoice], projection: str) -> str:
    """Preserved ranks laid out one row per transformer block, one column per matrix kind,
    then the spread of the preserved ratio and the trainable fraction."""
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    columns: list[str] = []
    for choice in choices:
        match = re.search(r"\.(\d+)\.", choice.name)
        block = match.group(1) if match else "-"
        kind = choice.name.rsplit(".", 1)[-1]
        if kind not in columns:
            columns.append(kind)
        rows[block][kind] = choice.rank
    width = max(6, *(len(kind) for kind in columns))
    lines = ["block " + "".join(kind.rjust(width + 1) for kind in columns)]
    for block, ranks in rows.items():
        cells = "".join(str(ranks.get(kind, "")).rjust(width + 1) for kind in columns)
        lines.append(block.rjust(5) + " " + cells)
    ratios = sorted(choice.rank / min(choice.shape) for choice in choices)
    total = sum(c.rank for c in choices) / sum(min(c.shape) for c in choices)
    weights = sum(c.shape[0] * c.shape[1] for c in choices)
    trainable = sum(trainable_directions(c.shape, c.rank, projection) for c in choices) / weights
    lines.append(
        f"preserved rank: {total:.1%} of the full rank over {len(choices)} matrices; "
        f"per matrix min {ratios[0]:.1%}, median {statistics.median(ratios):.1%}, "
        f"max {ratios[-1]:.1%}, sd {statistics.pstdev(ratios):.1%}"
    )
    lines.append(f"trainable ({projection}): {trainable:.1%} of the targeted weights' directions")
    return "\n".join(lines)


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
        _refuse_unsupported_sharding(model)
        modules = target_modules(model, config.target_modules)
        if config.rank_policy == "adaptive" and calibration is None:
            raise ForgetlessError(
                "adaptive OSFT ranks need calibration batches of the prior data "
                "(or use osft.rank_policy=fixed)"
            )
        importance, svds = None, {}
        if config.rank_policy == "adaptive":
            if config.importance == "matrix":  # the hooks rotate each output by its SVD
                svds = {name: _full_svd(module.weight) for name, module in modules.items()}
            # Forward passes only: under FSDP2 every process runs the same calibration batches.
            importance = layer_importance(model, modules, calibration, config.importance, svds)
            importance = _same_on_every_process(importance)
        choices = choose_ranks(modules, config, importance)
        bases = {}
        # One matrix at a time: a sharded matrix is gathered, decomposed and cut down to this
        # process's rows before the next, so only one whole matrix is held at once.
        for choice in tqdm(choices, desc="OSFT: SVD of target matrices", leave=False):
            weight = modules[choice.name].weight
            svd = svds.pop(choice.name, None) or _full_svd(weight)
            basis = SubspaceBasis(weight, choice.rank, config.projection, svd)
            if _distributed():
                # Every process must project onto the same subspaces; SVDs of equal weights are
                # not guaranteed to return bitwise-equal bases across processes.
                _broadcast_(basis.left)
                _broadcast_(basis.right)
            block = _row_block(choice.name, weight)
            bases[choice.name] = basis.shard_rows_(*block) if block else basis
        if config.freeze_untargeted:
            targeted = {id(module.weight) for module in modules.values()}
            for param in model.parameters():
                param.requires_grad_(id(param) in targeted)
        self.projector = OrthogonalSubspaceProjector(modules, choices, bases)
        self.config = config
        if verbose and _is_main_process():
            print("OSFT preserved (frozen) rank per matrix:\n" + self.projector.rank_table())

    @property
    def ranks(self) -> list[dict]:
        return [asdict(choice) for choice in self.projector.choices]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_launch(args)
        if model is not None:
            _refuse_unsupported_sharding(model)
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
    if not _distributed():
        return importance
    values = torch.tensor(list(importance.values()), dtype=torch.float64)
    _broadcast_(values)
    return dict(zip(importance, values.tolist(), strict=True))


def calibration_batches(
    tokenizer, records: Sequence[Record], max_length: int, samples: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Up to ``samples`` single-sequence batches from records drawn at random.

    One sequence per batch keeps padding out of the importance average without needing the
    attention mask inside the hooks.
    """
    # Sample before tokenising: late tasks of a long sequence pass tens of thousands of records.
    records = random.Random(seed).sample(list(records), min(samples, len(records)))
    features = build_training_features(tokenizer, records, max_length)
    return [{"input_ids": torch.tensor([row])} for row in features["input_ids"][:samples]]
