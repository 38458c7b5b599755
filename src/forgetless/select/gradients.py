"""Per-sample gradient features: batched, randomly projected, stored memory-mapped.

Per-sample gradients come from one ordinary batched forward and backward pass. For a linear
layer y = W x the gradient of sample b is sum_t dy[b, t] x[b, t]^T, so a forward hook keeps
each selected layer's input and a hook on its output gradient forms the per-sample gradients
with one einsum (the "ghost" trick of Opacus). This is written here rather than taken from
``torch.func.vmap(grad(...))``: on the models we target vmap falls back to a per-sample loop
inside attention's backward and ran slower than a plain batch-1 loop, while the hooks cost
about one batched backward. Only linear weights (and biases) are featurised — LoRA factors,
attention and MLP projections; norms and embeddings are left out.

The backward pass runs from the input embeddings only, so no weight gradient is ever
accumulated: the hooks are the only consumers. Each layer's per-sample gradient is projected
to d dimensions as soon as it exists, so memory holds one layer's per-sample gradients at a
time, whatever the parameter set.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forgetless.data.features import IGNORE_INDEX, sample_example
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.schema import identity_dump
from forgetless.select.config import GradientConfig
from forgetless.shards import ShardedRows, load_sharded_rows

logger = logging.getLogger(__name__)

# Largest projection block generated at once (entries); bounds memory for huge layers.
BLOCK_ENTRIES = 1 << 24


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's block list: the longest ModuleList of same-class modules."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (
                best is None or len(module) > len(best)
            ):
                best = module
    if best is None:
        raise ForgetlessError("cannot find the model's transformer blocks (no ModuleList)")
    return best


def module_ids(blocks) -> set[int]:
    """The ids of every module inside ``blocks`` (themselves included)."""
    return {id(module) for block in blocks for module in block.modules()}


def gradient_modules(
    model: nn.Module, parameters: str, last_blocks: int = 2, within_last: int | None = None
) -> dict[str, nn.Linear]:
    """The linear layers whose per-sample weight gradients form the features; with
    ``within_last``, only those of them in the last ``within_last`` transformer blocks."""
    blocks = list(decoder_blocks(model))
    if parameters == "lora":
        chosen = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)
        }
        if not chosen:
            raise ForgetlessError("parameters=lora but the model has no LoRA adapter")
    elif parameters in ("blocks", "last_blocks"):
        featured = blocks[-last_blocks:] if parameters == "last_blocks" else blocks
        wanted = module_ids(featured)
        chosen = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) in wanted
        }
    else:
        raise ForgetlessError(f"unknown gradient parameter set {parameters!r}")
    if within_last is None:
        return chosen
    kept = module_ids(blocks[-within_last:])
    return {name: module for name, module in chosen.items() if id(module) in kept}


class GraphStart:
    """Starts the autograd graph as high as the featured layers allow: at the hidden-state
    input of the lowest block holding one, so featuring only the last blocks costs a forward
    pass and the backward of those blocks, not a full backward. A featured layer outside the
    blocks other than the output layer (none in the usual architectures) moves the start
    down to the input embeddings' output."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear]):
        self.leaf: torch.Tensor | None = None
        blocks = list(decoder_blocks(model))
        head = model.get_output_embeddings()
        above = module_ids(blocks) | (module_ids([head]) if head is not None else set())
        if any(id(module) not in above for module in modules.values()):
            embeddings = model.get_input_embeddings()
            self._handle = embeddings.register_forward_hook(self._after_embeddings)
            return
        featured = {id(module) for module in modules.values()}
        lowest = next(
            (b for b in blocks if any(id(m) in featured for m in b.modules())), blocks[-1]
        )
        self._handle = lowest.register_forward_pre_hook(self._before_block, with_kwargs=True)

    def _after_embeddings(self, module, args, output):
        self.leaf = output.detach().requires_grad_(True)
        return self.leaf

    def _before_block(self, module, args, kwargs):
        if args:
            self.leaf = args[0].detach().requires_grad_(True)
            return (self.leaf, *args[1:]), kwargs
        self.leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": self.leaf}

    def remove(self) -> None:
        self._handle.remove()


class Projection(Protocol):
    """What turns a layer's per-sample gradients into feature columns: the random projector,
    the Kronecker sketch, or exact products with given directions (``select.exact``)."""

    dim: int  # feature columns
    dtype: type  # storage type of the features

    def add_into(
        self, total: torch.Tensor, name: str, x, grad, has_bias: bool, precondition=None
    ) -> torch.Tensor: ...


def flat_per_sample(x: torch.Tensor, grad: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """(batch, out * in [+ out]): each sample's weight gradient sum_t dy_t x_t^T in the
    weight's row-major layout, its bias gradient after it. x: (batch, T, in), grad:
    (batch, T, out)."""
    per_sample = torch.einsum("bto,bti->boi", grad, x).reshape(grad.shape[0], -1)
    if has_bias:
        per_sample = torch.cat([per_sample, grad.sum(1)], dim=1)
    return per_sample


class RandomProjector:
    """A seeded d-column random matrix per layer, applied to flattened per-sample gradients.

    Row blocks of at most ``BLOCK_ENTRIES`` entries are generated on the CPU from a seed
    derived from (seed, layer, block), so the features are identical on every device and in
    every run; blocks are kept until ``cache_bytes`` is used up, later ones are regenerated.
    """

    # Stored in half precision: the projection's own error is far larger than its rounding.
    dtype = np.float16

    def __init__(
        self, dim: int, kind: str, seed: int, device: torch.device, cache_bytes: int = 1 << 30
    ):
        self.dim, self.kind, self.seed, self.device = dim, kind, seed, torch.device(device)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0

    def _block(self, name: str, start: int, rows: int) -> torch.Tensor:
        key = (name, start)
        if key in self._cache:
            return self._cache[key]
        digest = hashlib.sha256(f"{self.seed}/{name}/{start}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if self.kind == "rademacher":
            # +-1 kept as int8 (4x more blocks fit the cache); the 1/sqrt(d) scale is applied
            # after the product.
            signs = torch.randint(0, 2, (rows, self.dim), generator=generator, dtype=torch.int8)
            block = (signs * 2 - 1).to(self.device)
        elif self.kind == "gaussian":
            block = torch.randn(rows, self.dim, generator=generator).to(self.device)
        else:
            raise ForgetlessError(f"unknown projector {self.kind!r}")
        size = block.numel() * block.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def project(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """(batch, D) -> (batch, d) for the layer called ``name``."""
        rows_per_block = max(1, BLOCK_ENTRIES // self.dim)
        total = flat.new_zeros(flat.shape[0], self.dim, dtype=torch.float32)
        for start in range(0, flat.shape[1], rows_per_block):
            stop = min(start + rows_per_block, flat.shape[1])
            block = self._block(name, start, stop - start)
            total += flat[:, start:stop].float() @ block.float()
        return total / self.dim**0.5

    def add_into(
        self, total: torch.Tensor, name: str, x, grad, has_bias: bool, precondition=None
    ) -> torch.Tensor:
        """Add the layer's projected per-sample gradients to ``total`` (batch, d); return
        their exact squared norms. x: (batch, T, in), grad: (batch, T, out). ``precondition``
        (name, per-sample gradients) -> features, applied before the projection."""
        per_sample = flat_per_sample(x, grad, has_bias)
        if precondition is not None:
            per_sample = precondition(name, per_sample)
        total += self.project(name, per_sample)
        return per_sample.pow(2).sum(1)


class KroneckerSketch:
    """Per-layer Kronecker-factored projections of per-sample weight gradients.

    A linear layer's per-sample gradient is G = sum_t dy_t x_t^T; its sketch
    P_out G P_in^T = sum_t (P_out dy_t)(P_in x_t)^T is formed from projected activations and
    output gradients, never from G itself (the LoGra projection of Choe et al., 2024, "What is
    your data worth to GPT?"). It is the random projection (P_out (x) P_in) vec(G), so inner
    products are preserved in expectation, at a cost per token of (out + in) x side instead of
    out x in x d. Each layer fills its own side x side slice of the feature vector; the
    ``projection_dim`` is shared evenly by the layers. A bias is the weight of a constant-1
    input column. The stored norm is the sketch's, an unbiased estimate of the squared norm.
    """

    dtype = np.float16  # as RandomProjector's

    def __init__(self, modules: dict[str, nn.Linear], dim: int, seed: int, device: torch.device):
        if not modules:
            raise ForgetlessError("no layers to featurise")
        self.side = max(1, math.isqrt(dim // len(modules)))
        self.dim = self.side**2 * len(modules)
        self.offsets = {name: index * self.side**2 for index, name in enumerate(modules)}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in modules.items():
            inputs = module.in_features + (module.bias is not None)
            self.factors[name] = (
                self._signs(seed, name, "out", module.out_features).to(device),
                self._signs(seed, name, "in", inputs).to(device),
            )

    def _signs(self, seed: int, name: str, side_name: str, rows: int) -> torch.Tensor:
        digest = hashlib.sha256(f"kronecker/{seed}/{name}/{side_name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        signs = torch.randint(0, 2, (rows, self.side), generator=generator, dtype=torch.int8)
        return (signs.float() * 2 - 1) / self.side**0.5

    def add_into(
        self, total: torch.Tensor, name: str, x, grad, has_bias: bool, precondition=None
    ) -> torch.Tensor:
        if precondition is not None:
            raise ForgetlessError(
                "a kronecker sketch never forms the per-sample gradient, so it cannot be "
                "Adam-preconditioned: set select.gradient.preconditioner=none"
            )
        out_factor, in_factor = self.factors[name]
        if has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)
        sketch = torch.einsum("bta,btc->bac", grad @ out_factor, x @ in_factor)
        sketch = sketch.reshape(grad.shape[0], -1)
        start = self.offsets[name]
        total[:, start : start + sketch.shape[1]] += sketch
        return sketch.pow(2).sum(1)


class AdamPreconditioner:
    """A sample's gradient g turned into the Adam update it would make from the warm-up's
    state, m' / sqrt(v' + eps) with m' = b1 m + (1 - b1) g and v' = b2 v + (1 - b2) g^2: the
    training-gradient features of LESS (Xia et al., 2024), whose form this follows."""

    EPS = 1e-8

    def __init__(self, moments: dict[str, torch.Tensor], modules: dict[str, nn.Linear], device):
        self.beta1, self.beta2 = (float(value) for value in moments["betas"])
        self.state = {}
        for name in modules:
            key = _parameter_name(name, moments)
            self.state[name] = (
                moments[f"{key}:exp_avg"].reshape(1, -1).float().to(device),
                moments[f"{key}:exp_avg_sq"].reshape(1, -1).float().to(device),
            )

    def __call__(self, name: str, per_sample: torch.Tensor) -> torch.Tensor:
        first, second = self.state[name]
        first = self.beta1 * first + (1 - self.beta1) * per_sample
        second = self.beta2 * second + (1 - self.beta2) * per_sample.pow(2)
        return first / torch.sqrt(second + self.EPS)


def _parameter_name(module_name: str, moments: dict[str, torch.Tensor]) -> str:
    """The warm-up's name of a hooked module's weight (the features may hook a wrapper
    around the model the warm-up trained, which prefixes the names)."""
    wanted = f"{module_name.split('base_model.model.', 1)[-1]}.weight:exp_avg"
    matches = [key for key in moments if key.endswith(wanted)]
    if len(matches) != 1:
        raise ForgetlessError(f"the warm-up's Adam state has no moments for {module_name}")
    return matches[0].removesuffix(":exp_avg")


class PerSampleGradients:
    """Hooks that turn one batched backward pass into projected per-sample gradients."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        projector: Projection,
        precondition=None,
    ):
        self.modules, self.projector, self.precondition = modules, projector, precondition
        self.projected: torch.Tensor | None = None
        self.squared_norm: torch.Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._forward_hook(name))
            for name, module in modules.items()
        ]

    def reset(self, batch: int, device: torch.device) -> None:
        self.projected = torch.zeros(batch, self.projector.dim, device=device)
        self.squared_norm = torch.zeros(batch, device=device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()
                has_bias = module.bias is not None
                output.register_hook(lambda grad: self._accumulate(name, x, grad, has_bias))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad: torch.Tensor, has_bias: bool) -> None:
        batch = grad.shape[0]
        grad = grad.reshape(batch, -1, grad.shape[-1]).float()
        x = x.reshape(batch, -1, x.shape[-1]).float()
        self.squared_norm += self.projector.add_into(
            self.projected, name, x, grad, has_bias, self.precondition
        )


def per_sample_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss of each sequence and its number of target tokens."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    token_loss = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    counts = valid.sum(1)
    return (token_loss * valid).sum(1) / counts.clamp(min=1), counts


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded ids, attention mask and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (input_ids, target) in enumerate(examples):
        ids[row, : len(input_ids)] = torch.tensor(input_ids)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(input_ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def length_sorted_batches(
    tokenizer,
    records: Sequence[Record],
    indices: Iterable[int],
    max_length: int,
    batch_size: int,
    device,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padded batches of the records at ``indices`` that have a target token: (their indices,
    ids, attention mask, labels). Similar lengths share a batch, so little compute goes to
    padding; equal lengths keep the order of ``indices``."""
    examples = {index: sample_example(tokenizer, records[index], max_length) for index in indices}
    usable = sorted(
        (index for index, example in examples.items() if example is not None),
        key=lambda index: len(examples[index][0]),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for first in range(0, len(usable), batch_size):
        batch = usable[first : first + batch_size]
        yield (batch, *pad_batch([examples[index] for index in batch], pad_id, device))


@dataclass
class GradientFeatures:
    """Projected per-sample gradients (rows) with their ids, losses and exact norms."""

    ids: list[str]
    vectors: np.ndarray  # (n, d) float16, memory-mapped
    loss: np.ndarray  # mean token loss
    norm: np.ndarray  # norm of the full (unprojected) gradient
    tokens: np.ndarray  # target tokens; 0 marks a sample with nothing to learn

    @property
    def valid(self) -> np.ndarray:
        return self.tokens > 0

    def dense(self) -> np.ndarray:
        return np.asarray(self.vectors, dtype=np.float32)


def load_gradient_features(directory: str | Path) -> GradientFeatures:
    ids, vectors, columns = load_sharded_rows(directory)
    return GradientFeatures(ids, vectors, columns["loss"], columns["norm"], columns["tokens"])


def extract_gradient_features(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    settings: GradientConfig,
    output_dir: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    description: str = "gradients",
    adam_moments: dict[str, torch.Tensor] | None = None,
    within_last_blocks: int | None = None,
    projector: Projection | None = None,
) -> GradientFeatures:
    """Projected per-sample gradients of ``records`` under ``model``, written to ``output_dir``.

    ``model`` must already carry the parameter set (e.g. the warmed-up LoRA adapter). With
    ``adam_moments`` (the warm-up's, ``forgetless.select.warmup``) each gradient is
    Adam-preconditioned before the projection. The work is cut into shards; a rerun with the
    same inputs skips the finished ones. ``within_last_blocks`` keeps only the featured
    layers of the last N blocks (same projection per layer, so the result is their part of
    the whole features) and stops the backward pass below them. A given ``projector``
    (e.g. ``forgetless.select.exact.ReferenceProducts``) replaces the one the settings
    describe; its ``identity`` joins the shards' identity and its ``dtype`` is the storage's.
    """
    ids = [record.id or str(index) for index, record in enumerate(records)]
    device = next(model.parameters()).device
    modules = gradient_modules(model, settings.parameters, settings.last_blocks, within_last_blocks)
    extra = {} if projector is None else {"projector": projector.identity}
    if projector is None and settings.projector == "kronecker":
        projector = KroneckerSketch(modules, settings.projection_dim, seed, device)
    elif projector is None:
        projector = RandomProjector(
            settings.projection_dim,
            settings.projector,
            seed,
            device,
            cache_bytes=settings.projector_cache_mb << 20,
        )
    storage = projector.dtype
    store = ShardedRows(
        output_dir,
        ids,
        identity={
            "settings": identity_dump(settings),
            "seed": seed,
            "preconditioned": adam_moments is not None,
            **({} if within_last_blocks is None else {"within_last_blocks": within_last_blocks}),
            **extra,
        },
        shard_size=settings.shard_size,
        width=projector.dim,
        dtype=storage,
        columns={"loss": np.float32, "norm": np.float32, "tokens": np.int32},
    )
    vectors, stats = store.matrix, store.columns
    precondition = (
        None if adam_moments is None else AdamPreconditioner(adam_moments, modules, device)
    )
    hooks = PerSampleGradients(modules, projector, precondition)
    was_training = model.training
    model.eval()  # no dropout: a sample's gradient must not depend on its batch or the run
    requires = {name: param.requires_grad for name, param in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    graph_start = GraphStart(model, modules)
    bar = tqdm(total=len(records), desc=description, disable=not progress, unit="sample")
    bar.update(store.done)
    try:
        for shard, start, stop in store.pending():
            batches = length_sorted_batches(
                tokenizer,
                records,
                range(start, stop),
                settings.max_length,
                settings.batch_size,
                device,
            )
            featured = 0
            for batch, ids_t, mask, labels in batches:
                hooks.reset(len(batch), device)
                logits = model(input_ids=ids_t, attention_mask=mask, use_cache=False).logits
                loss, counts = per_sample_losses(logits, labels)
                # A sum of per-sample means: each sample's hooks see its own loss's gradient.
                torch.autograd.grad(loss.sum(), graph_start.leaf)
                vectors[batch] = hooks.projected.cpu().numpy().astype(storage)
                stats["loss"][batch] = loss.detach().cpu().numpy()
                stats["norm"][batch] = hooks.squared_norm.sqrt().cpu().numpy()
                stats["tokens"][batch] = counts.cpu().numpy()
                featured += len(batch)
                bar.update(len(batch))
            bar.update(stop - start - featured)  # the records without a target token
            store.commit(shard)
    finally:
        bar.close()
        hooks.remove()
        graph_start.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(requires[name])
        model.train(was_training)
    skipped = int((stats["tokens"] == 0).sum())
    if skipped:
        logger.warning(
            "%d of %d samples had no target token and get zero features", skipped, len(ids)
        )
    del vectors, store
    return load_gradient_features(output_dir)


@torch.no_grad()
def sample_losses(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    max_length: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean token loss and target-token count of each record under ``model`` (forward only).

    Records with nothing to learn get loss 0 and count 0.
    """
    losses = np.zeros(len(records), np.float32)
    counts = np.zeros(len(records), np.int32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = length_sorted_batches(
        tokenizer, records, range(len(records)), max_length, batch_size, device
    )
    bar = tqdm(total=len(records), desc="losses", disable=not progress, unit="sample")
    for batch, ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss, count = per_sample_losses(logits, labels)
        losses[batch] = loss.cpu().numpy()
        counts[batch] = count.cpu().numpy()
        bar.update(len(batch))
    bar.update(bar.total - bar.n)  # the records without a target token
    bar.close()
    model.train(was_training)
    return losses, counts
