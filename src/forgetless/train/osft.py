"""OSFT: full fine-tuning constrained to the orthogonal complement of each matrix's top
singular subspace ("Sculpting Subspaces", arXiv 2504.07097), with adaptive per-layer ranks.

For every targeted weight ``W = U S Vᵀ`` the top-k singular directions are frozen: an update
``ΔW`` must satisfy ``U_highᵀ ΔW = 0`` and ``ΔW V_high = 0``, i.e. ``ΔW = P(ΔW)`` with
``P(X) = (I − U_high U_highᵀ) X (I − V_high V_highᵀ)``.

Why not PEFT's OSF tuner: it re-parameterises W into trainable U/S/V factors and rebuilds W in
every forward, which doubles the step time and keeps full U, S, V per matrix. Here the weights
stay dense and the forward is unchanged; only the projection bases are stored, and the
projection runs once per optimizer step (never per micro-batch):

1. before the step the gradient is projected, so the optimizer's moments live in the
   allowed subspace;
2. after the step the parameter *update* is projected again, because AdamW's element-wise
   scaling (and decoupled weight decay) leak a projected gradient back into the frozen
   subspace.

Neither transformers, PEFT nor accelerate offers step-level projection of dense weights, so
this module is written by hand; it plugs into any ``transformers.Trainer`` as a callback.
"""

from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from forgetless.data.features import build_training_features
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.train.config import OsftConfig


@dataclass
class RankChoice:
    """The preserved (frozen) rank chosen for one weight matrix, and the importance behind it."""

    name: str
    shape: tuple[int, int]
    rank: int
    importance: float | None


class SubspaceBasis:
    """Projection onto the orthogonal complement of one matrix's top-k singular subspace.

    A thin SVD gives ``U`` (m×r) and ``V`` (n×r) with r = min(m, n). On the side where the
    factor is square (r equals that side's dimension), ``I − U_high U_highᵀ = U_low U_lowᵀ``,
    so whichever of U_high and U_low has fewer columns is stored: at high preserved ratios
    (late tasks of a sequence) that makes both the memory and the flops scale with the
    trainable rank instead of the frozen one.
    """

    def __init__(self, weight: torch.Tensor, rank: int):
        m, n = weight.shape
        r = min(m, n)
        if not 0 < rank < r:
            raise ValueError(f"preserved rank must be in [1, {r - 1}], got {rank}")
        u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        v = vh.mT
        self.rank = rank
        # A factor is square when its side equals r; only then does its complement fit in it.
        self.left_complement = m == r and (m - rank) < rank
        self.right_complement = n == r and (n - rank) < rank
        self.left = (u[:, rank:] if self.left_complement else u[:, :rank]).contiguous()
        self.right = (v[:, rank:] if self.right_complement else v[:, :rank]).contiguous()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``(I − U_high U_highᵀ) x (I − V_high V_highᵀ)`` in fp32; ``x`` is overwritten when
        it is fp32 (callers pass temporaries or gradients they own)."""
        x = x.float()
        if self.left_complement:
            x = self.left @ (self.left.mT @ x)
        else:
            x.addmm_(self.left, self.left.mT @ x, alpha=-1.0)
        if self.right_complement:
            x = (x @ self.right) @ self.right.mT
        else:
            x.addmm_(x @ self.right, self.right.mT, alpha=-1.0)
        return x

    def high_energy(self, x: torch.Tensor) -> tuple[float, float]:
        """(‖U_highᵀ x‖, ‖x V_high‖), the parts of ``x`` in the frozen subspaces."""
        x = x.float()
        left = x - self.left @ (self.left.mT @ x) if self.left_complement else self.left.mT @ x
        right = x - (x @ self.right) @ self.right.mT if self.right_complement else x @ self.right
        return float(left.norm()), float(right.norm())

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


def _matrix_comparison(module: nn.Linear):
    d = min(module.in_features, module.out_features)

    def compare(x, y):
        if module.bias is not None:
            y = y - module.bias
        return x.reshape(-1, module.in_features)[:, :d], y.reshape(-1, module.out_features)[:, :d]

    return compare


def _block_comparison(x, y):
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


@torch.no_grad()
def layer_importance(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    calibration: Iterable[Mapping[str, torch.Tensor]],
    granularity: str = "block",
) -> dict[str, float]:
    """Importance per targeted matrix: the mean over calibration tokens of cos(x, f(x)).

    ``matrix``: f is the matrix itself, x its input (first min(m, n) coordinates when W is not
    square) -- the literal score. ``block``: f is the transformer block holding the matrix, x
    the residual stream entering it; every matrix of a block shares the block's score. The
    block score is the default because on SmolLM2 the per-matrix cosines average to about 0
    (q/k/v/o and MLP maps do not keep coordinates aligned), which makes the normalisation by
    the mean meaningless; the residual stream keeps them aligned (cosines ~0.5-0.99).
    """
    store: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if granularity == "matrix":
        owners = {name: name for name in modules}
        hooked = {name: (module, _matrix_comparison(module)) for name, module in modules.items()}
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


def choose_ranks(
    modules: Mapping[str, nn.Linear],
    config: OsftConfig,
    importance: Mapping[str, float] | None = None,
) -> list[RankChoice]:
    """Preserved rank per matrix: adaptive (from importance), fixed ratio, or an override."""
    if config.rank_policy == "adaptive":
        if importance is None:
            raise ForgetlessError("adaptive OSFT ranks need calibration data")
        mean = sum(importance.values()) / len(importance)
        if mean <= 0:
            raise ForgetlessError(
                "adaptive OSFT ranks: the mean input/output cosine importance is not positive "
                f"({mean:.3g}); use osft.rank_policy=fixed for this model"
            )
    overrides = [(re.compile(pattern), value) for pattern, value in config.rank_overrides.items()]
    choices = []
    for name, module in modules.items():
        shape = tuple(module.weight.shape)
        r = min(shape)
        score = importance.get(name) if importance else None
        override = next((value for regex, value in overrides if regex.search(name)), None)
        if override is not None:
            wanted = override * r if override < 1 else override
        elif config.rank_policy == "adaptive":
            normalised = score / mean
            wanted = (config.mrr + normalised * (config.trr - config.mrr)) * r
        else:
            wanted = config.preserve_ratio * r
        rank = int(min(max(round(wanted), 1), r - 1))
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


def refuse_sharded_launch(args=None) -> None:
    """Refuse FSDP and DeepSpeed before any step, however they were requested."""
    requested = [name for name in SHARDING_ENVIRONMENT if os.environ.get(name, "").lower() in
                 ("1", "true", "yes")]  # fmt: skip
    if args is not None and (args.deepspeed or args.fsdp):
        requested.append("TrainingArguments")
    if requested:
        raise ForgetlessError(
            f"OSFT does not support FSDP or DeepSpeed (requested by {', '.join(requested)}): "
            "they shard each matrix or its gradient, and the projection needs them whole; "
            "use DDP (torchrun, or accelerate launch without FSDP/DeepSpeed)"
        )


def _refuse_sharded(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if type(param).__name__ == "DTensor" or "_flat_param" in name:
            raise ForgetlessError(
                "OSFT needs every weight matrix whole on each process; FSDP / ZeRO-3 shard them. "
                "Use DDP (plain `accelerate launch` or torchrun) instead"
            )


class OrthogonalSubspaceProjector:
    """Holds the bases of all targeted matrices and applies the two projections."""

    def __init__(self, named_weights: Mapping[str, nn.Parameter], ranks: Iterable[RankChoice]):
        self.weights = dict(named_weights)
        self.choices = list(ranks)
        self.bases: dict[str, SubspaceBasis] = {}
        for choice in tqdm(self.choices, desc="OSFT: SVD of target matrices", leave=False):
            weight = self.weights[choice.name]
            self.bases[choice.name] = SubspaceBasis(weight, choice.rank)
        if _distributed():
            # Every process must project onto the same subspaces; SVDs of equal weights are
            # not guaranteed to return bitwise-equal bases across processes.
            for basis in self.bases.values():
                torch.distributed.broadcast(basis.left, src=0)
                torch.distributed.broadcast(basis.right, src=0)
        self._before_step: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def project_gradients(self) -> None:
        for name, basis in self.bases.items():
            grad = self.weights[name].grad
            if grad is not None:
                projected = basis.project(grad)
                if projected is not grad:
                    grad.copy_(projected)

    @torch.no_grad()
    def remember_weights(self) -> None:
        """Keep the pre-step weights so the update itself can be projected after the step."""
        self._before_step = {
            name: weight.detach().clone()
            for name, weight in self.weights.items()
            if weight.grad is not None and name in self.bases
        }

    @torch.no_grad()
    def project_updates(self) -> None:
        for name, before in self._before_step.items():
            weight = self.weights[name]
            update = self.bases[name].project(weight.detach().float() - before.float())
            weight.copy_(before.float().add_(update))
        self._before_step = {}

    def rank_table(self) -> str:
        return format_rank_table(self.choices)


def format_rank_table(choices: list[RankChoice]) -> str:
    """Preserved ranks laid out one row per transformer block, one column per matrix kind."""
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
    total = sum(c.rank for c in choices) / sum(min(c.shape) for c in choices)
    lines.append(f"preserved rank: {total:.1%} of the full rank over {len(choices)} matrices")
    return "\n".join(lines)


class OsftCallback(TrainerCallback):
    """Drop-in OSFT for any ``transformers.Trainer`` (or TRL ``SFTTrainer``).

    Build it from the model *before* training starts (and before resuming a checkpoint: the
    subspaces must come from the starting weights): it chooses the ranks, takes the SVDs and,
    with ``freeze_untargeted``, freezes the other parameters so the Trainer's optimizer skips
    them. ``calibration`` is an iterable of model-input batches (``input_ids`` etc.) from the
    prior data, needed by the adaptive rank policy.
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
        _refuse_sharded(model)
        modules = target_modules(model, config.target_modules)
        importance = None
        if config.rank_policy == "adaptive":
            if calibration is None:
                raise ForgetlessError(
                    "adaptive OSFT ranks need calibration batches of the prior data "
                    "(or use osft.rank_policy=fixed)"
                )
            importance = layer_importance(model, modules, calibration, config.importance)
            importance = _same_on_every_process(importance)
        choices = choose_ranks(modules, config, importance)
        if config.freeze_untargeted:
            targeted = {id(module.weight) for module in modules.values()}
            for param in model.parameters():
                param.requires_grad_(id(param) in targeted)
        self.projector = OrthogonalSubspaceProjector(
            {name: module.weight for name, module in modules.items()}, choices
        )
        self.config = config
        if verbose and _is_main_process():
            print("OSFT preserved (frozen) rank per matrix:\n" + self.projector.rank_table())

    @property
    def ranks(self) -> list[dict]:
        return [asdict(choice) for choice in self.projector.choices]

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharded_launch(args)
        device = next(iter(self.projector.weights.values())).device
        for basis in self.projector.bases.values():
            basis.to(device)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.projector.project_gradients()
        self.projector.remember_weights()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector.project_updates()


def _same_on_every_process(importance: dict[str, float]) -> dict[str, float]:
    if not _distributed():
        return importance
    values = torch.tensor(list(importance.values()), dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        values = values.cuda()
    torch.distributed.broadcast(values, src=0)
    return dict(zip(importance, values.cpu().tolist(), strict=True))


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
