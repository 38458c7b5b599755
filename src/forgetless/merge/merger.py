"""Merge N fine-tuned experts into their base model, one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from forgetless.cards import CardContent, Provenance, write_card
from forgetless.errors import ForgetlessError
from forgetless.hub import check_push_access, push_model
from forgetless.io import atomic_directory, write_json_atomic
from forgetless.merge import MERGE_REPORT
from forgetless.merge.checkpoint import (
    Checkpoint,
    copy_non_weight_files,
    parse_size,
    resolve_checkpoint_dir,
    write_streaming,
)
from forgetless.merge.config import MergeConfig
from forgetless.merge.diagnostics import OverlapMeter, expected_collision_rate
from forgetless.merge.lora import LoraAdapter, is_adapter
from forgetless.merge.methods import merge_tensor
from forgetless.merge.rules import merge_rule
from forgetless.registry import lookup

Expert = Checkpoint | LoraAdapter


@dataclass
class MergeReport:
    method: str
    keep: float
    rescale: bool
    scale: float
    seed: int
    masks: str | None  # None: the method draws no random masks
    densities: list[float] | None
    weights: list[float] | None
    normalize: bool
    base: str
    experts: list[str]
    tensors: int
    parameters: int
    overlap: dict
    expected_collision_rate: float | None
    hub_url: str | None = None  # where it was pushed, if it was

    def to_dict(self) -> dict:
        # Where the merge was published is not part of what it is (and is known only after
        # merge_report.json is written).
        return {key: value for key, value in asdict(self).items() if key != "hub_url"}


def merge_checkpoints(
    base: str,
    experts: Sequence[str],
    output_dir: str | Path,
    config: MergeConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
) -> MergeReport:
    """Merge ``experts`` (fine-tunes of ``base``) into a plain HF checkpoint in ``output_dir``.

    ``base`` and each expert are checkpoint directories, hub ids or the ``smollm2-135m``
    alias; an expert may also be a PEFT LoRA adapter folder of the base, whose deltas are
    computed from its factors tensor by tensor. The output has the base's config and
    tokenizer, a ``merge_report.json`` with the overlap diagnostics and a model card
    (README.md); the same inputs and seed give the same bytes. With ``push_to_hub`` (a
    repository id) the access is checked before any checkpoint is read, and the merged folder
    is uploaded (``private`` if the repository is new). ``config.weights`` and
    ``config.densities`` must have one value per expert; that is checked before anything is
    read.
    """
    config = config or MergeConfig()
    if not experts:
        raise ForgetlessError("give at least one expert checkpoint to merge")
    keeps = config.expert_keeps(len(experts))
    output = Path(output_dir)
    # Compared before the emptiness check, which would otherwise hide the real mistake.
    if any(Path(name).expanduser().resolve() == output.resolve() for name in [base, *experts]):
        raise ForgetlessError(f"the output {output} is one of the inputs; choose a new directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ForgetlessError(f"{output} exists and is not empty; pass --overwrite to replace it")
    if push_to_hub is not None:
        check_push_access(push_to_hub)
    # The experts first: a mistyped expert fails before the base is fetched or cached.
    expert_ckpts = [open_expert(name) for name in experts]
    base_ckpt = Checkpoint.open(base)
    inputs = {ckpt.directory.resolve() for ckpt in [base_ckpt, *expert_ckpts]}
    if output.resolve() in inputs:
        raise ForgetlessError(f"the output {output} is one of the inputs; choose a new directory")
    for expert in expert_ckpts:
        expert.check_against(base_ckpt)
    max_shard_bytes = parse_size(config.max_shard_size)

    meter = OverlapMeter(len(expert_ckpts))
    with atomic_directory(output) as staging:
        tensors = _merged_tensors(base_ckpt, expert_ckpts, config, meter, progress)
        write_streaming(staging, base_ckpt.tensors, tensors, max_shard_bytes)
        copy_non_weight_files(base_ckpt.directory, staging)
        random_masks = merge_rule(config.method).random_masks
        report = MergeReport(
            method=config.method,
            keep=config.keep,
            rescale=config.rescales(),
            scale=config.scale,
            seed=config.seed,
            masks=config.masks if random_masks else None,
            densities=config.densities,
            weights=config.weights,
            normalize=config.normalize,
            base=base,
            experts=list(experts),
            tensors=len(base_ckpt.tensors),
            parameters=meter.positions,
            overlap=meter.summary(),
            # What independent masks would give, whichever scheme ran: the measured rate of
            # disjoint masks (0) reads against it.
            expected_collision_rate=(
                round(expected_collision_rate(keeps), 6) if random_masks else None
            ),
        )
        write_json_atomic(staging / MERGE_REPORT, report.to_dict())
        write_card(staging, _card(report))
    if push_to_hub is not None:
        message = f"forgetless: {len(experts)} experts merged into {base} with {config.method}"
        report.hub_url = push_model(output, push_to_hub, private, message)
    return report


def _card(report: MergeReport) -> CardContent:
    overlap = report.overlap
    experts = [
        {
            "expert": name,
            "delta norm": overlap["delta_norm"][i],
            "kept": overlap["kept_fraction"][i],
        }
        for i, name in enumerate(report.experts)
    ]
    return CardContent(
        kind="merge",
        method=report.method,
        method_summary=lookup("merge", report.method).summary,
        provenance=Provenance(report.base),
        settings={
            "method": report.method,
            "keep": report.keep,
            "rescale": report.rescale,
            "scale": report.scale,
            "seed": report.seed,
            "masks": report.masks,
            "densities": report.densities,
            "weights": report.weights,
            "normalize": report.normalize,
        },
        compute={"tensors": report.tensors, "parameters": report.parameters},
        experts=experts,
        diagnostics={
            "collision rate (kept by two or more experts)": overlap["collision_rate"],
            "expected with independent masks": report.expected_collision_rate,
            "mean abs cosine between expert deltas, raw": overlap["mean_abs_cosine_raw"],
            "mean abs cosine between expert deltas, masked": overlap["mean_abs_cosine_masked"],
        },
    )


def open_expert(name: str) -> Expert:
    """A full fine-tuned checkpoint, or a PEFT LoRA adapter folder (adapter_config.json)."""
    directory = resolve_checkpoint_dir(name)
    if is_adapter(directory):
        return LoraAdapter.open(name, directory)
    return Checkpoint.open(name, directory)


def _merged_tensors(
    base: Checkpoint,
    experts: list[Expert],
    config: MergeConfig,
    meter: OverlapMeter,
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    for key in tqdm(base.tensors, desc=f"merging ({config.method})", disable=not progress):
        base_tensor = base.read(key)
        if not base_tensor.is_floating_point():
            yield key, base_tensor
            continue
        reference = base_tensor.float()

        def delta(expert: int, key: str = key, reference: torch.Tensor = reference):
            return experts[expert].delta(key, reference)

        meter.start(key, reference.numel())
        merged = merge_tensor(key, delta, len(experts), config, meter)
        meter.finish()
        result = reference.add_(merged, alpha=config.scale).to(base_tensor.dtype)
        if not bool(torch.isfinite(result).all()):
            raise ForgetlessError(
                f"the merged {key} is not finite in {base_tensor.dtype} (merge.scale "
                f"{config.scale:g} too large?); nothing was written"
            )
        yield key, result
        del base_tensor, reference, merged, result
