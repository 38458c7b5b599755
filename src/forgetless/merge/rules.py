"""The merge methods, each described as mergekit describes its own: a sparsifier (which
entries of an expert's delta survive), a rescaling (whether survivors are divided by the kept
fraction) and a consensus rule (how the experts' surviving entries combine).

The components' tensor code is in :mod:`forgetless.merge.methods`; this module only names the
combinations, so the configuration can validate a merge method without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.registry import Method, lookup, register


@dataclass(frozen=True)
class MergeRule:
    sparsifier: str  # a key of methods.SPARSIFIERS: none, random, magnitude
    consensus: str  # a key of methods.CONSENSUS: sum, sign_elect
    # Whether kept entries are divided by keep when merge.rescale is unset; None: never.
    rescale: bool | None

    @property
    def random_masks(self) -> bool:
        return self.sparsifier == "random"


def register_merge_method(name: str, summary: str, rule: MergeRule) -> Method:
    """Register a merge method as a combination of components."""
    return register(
        Method(
            "merge",
            name,
            summary,
            consumes="expert checkpoints of one base",
            produces="model",
            settings="merge",
            implementation=rule,
        )
    )


def merge_rule(name: str) -> MergeRule:
    return lookup("merge", name).implementation


register_merge_method(
    "sotu",
    "random sparse masks per expert, masked deltas summed (Sparse Orthogonal Parameters Tuning)",
    MergeRule("random", "sum", rescale=False),
)
register_merge_method(
    "task_arithmetic",
    "plain sum of the experts' deltas, times merge.scale",
    MergeRule("none", "sum", rescale=None),
)
register_merge_method(
    "ties",
    "keep each delta's largest magnitudes, elect a sign per entry, average the agreeing ones",
    MergeRule("magnitude", "sign_elect", rescale=None),
)
register_merge_method(
    "dare",
    "random drop with the survivors rescaled by 1/keep, then summed",
    MergeRule("random", "sum", rescale=True),
)
