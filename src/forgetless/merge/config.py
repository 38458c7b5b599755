"""Merge settings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from forgetless.errors import ForgetlessError
from forgetless.merge.rules import merge_rule
from forgetless.registry import names
from forgetless.schema import Section

# Sums of keeps such as 10 × 0.1 land a rounding error above 1.
_KEEP_SUM_TOLERANCE = 1e-9


class MergeConfig(Section):
    method: str = Field(
        "sotu",
        description="A registered merge method (`forgetless methods merge`): sotu (random "
        "sparse masks summed), task_arithmetic (plain sum of deltas), ties (trim, elect sign, "
        "disjoint mean) or dare (random drop with rescaling, then sum).",
    )
    keep: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Fraction of each expert's delta kept (1 - p): at random for sotu and "
        "dare, the largest magnitudes per tensor for ties; ignored by task_arithmetic. Rule "
        "of thumb for sotu: about 1 / number of experts.",
    )
    masks: Literal["independent", "disjoint"] = Field(
        "independent",
        description="Random masks of sotu and dare: independent (a Bernoulli(keep) draw per "
        "expert; two experts may keep the same entry) or disjoint (one seeded draw per entry "
        "shared by all experts, each expert keeping its own interval of it: no entry is kept "
        "twice, so the masked deltas are exactly orthogonal; the keeps must sum to at most 1).",
    )
    densities: list[Annotated[float, Field(gt=0.0, le=1.0)]] | None = Field(
        None,
        min_length=1,
        description="Per-expert keep, in the order of the experts (mergekit's density); "
        "overrides keep. Not for task_arithmetic, which keeps every entry.",
    )
    weights: list[Annotated[float, Field(gt=0.0)]] | None = Field(
        None,
        min_length=1,
        description="Per-expert multiplier of its masked, rescaled delta, in the order of the "
        "experts (mergekit's weight). Default: 1 each. ties elects signs on the weighted "
        "deltas and divides by the weights of the experts that agree.",
    )
    normalize: bool = Field(
        False,
        description="Divide the summed delta by the sum of the weights (the number of experts "
        "without merge.weights), so task_arithmetic is the experts' average and dare is that "
        "average in expectation. ties always normalises (its disjoint mean).",
    )
    rescale: bool | None = Field(
        None,
        description="Divide kept entries by keep (DARE's 1/(1-p)). Default: the method's own "
        "(false for sotu, the paper's plain masked sum; true for dare); ties and "
        "task_arithmetic never rescale.",
    )
    scale: float = Field(
        1.0, gt=0.0, description="Multiplier of the merged delta (task arithmetic's lambda)."
    )
    seed: int = Field(
        0, description="Seed of the random masks; each expert and tensor derives its own."
    )
    max_shard_size: str = Field(
        "5GB", description="Largest output safetensors shard, e.g. 500MB or 5GB."
    )

    @model_validator(mode="after")
    def _settings_the_method_uses(self) -> MergeConfig:
        # An unknown method is reported by the whole config's check, naming the choices.
        if self.method not in names("merge"):
            return self
        rule = merge_rule(self.method)
        if self.masks == "disjoint" and not rule.random_masks:
            raise ValueError(
                f"masks 'disjoint' partitions random masks (sotu, dare); {self.method} has none"
            )
        if self.densities is not None and rule.sparsifier == "none":
            raise ValueError(f"densities set per-expert keeps; {self.method} keeps every entry")
        return self

    def rescales(self) -> bool:
        default = merge_rule(self.method).rescale
        if default is None:
            return False
        return default if self.rescale is None else self.rescale

    def expert_keeps(self, experts: int) -> list[float]:
        """Each expert's keep; a one-line error unless the settings fit ``experts`` experts."""
        for name in ("densities", "weights"):
            values = getattr(self, name)
            if values is not None and len(values) != experts:
                raise ForgetlessError(
                    f"merge.{name} has {len(values)} values for {experts} experts; give one "
                    "per expert, in the order the experts are given"
                )
        keeps = list(self.densities) if self.densities is not None else [self.keep] * experts
        if self.masks == "disjoint" and sum(keeps) > 1 + _KEEP_SUM_TOLERANCE:
            given = (
                f"merge.densities sum to {sum(keeps):.4g}"
                if self.densities is not None
                else f"{experts} experts × merge.keep {self.keep:g} = {sum(keeps):.4g}"
            )
            raise ForgetlessError(
                f"merge.masks disjoint gives each expert its own share of the entries, so the "
                f"keeps of the {experts} experts must sum to at most 1: {given}"
            )
        return keeps

    def expert_weights(self, experts: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * experts
