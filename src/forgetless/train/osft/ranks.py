"""How much of each matrix OSFT freezes: layer importance on calibration data, preserved
ratios, ranks, the rank table, and the LoRA rank with as many trainable parameters."""

from __future__ import annotations

import random
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from forgetless.data.features import build_training_features
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.train.config import OsftConfig
from forgetless.train.osft.subspace import (
    Svd,
    trainable_directions,
)


@dataclass
class RankChoice:
    """The preserved (frozen) rank chosen for one weight matrix, and the importance behind it."""

    name: str
    shape: tuple[int, int]
    rank: int
    importance: float | None


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
