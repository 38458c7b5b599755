"""Merge settings."""

from __future__ import annotations

from pydantic import Field

from forgetless.merge.rules import merge_rule
from forgetless.schema import Section


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

    def rescales(self) -> bool:
        default = merge_rule(self.method).rescale
        if default is None:
            return False
        return default if self.rescale is None else self.rescale
