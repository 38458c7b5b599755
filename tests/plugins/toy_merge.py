"""A merge method added from outside forgetless: one module, one consensus rule and its
registration. ``masked_mean`` keeps SoTU's random masks but averages the masked deltas
instead of summing them."""

from forgetless.merge.methods import CONSENSUS
from forgetless.merge.rules import MergeRule, register_merge_method


def _mean(masked, experts):
    total = masked(0)
    for expert in range(1, experts):
        total.add_(masked(expert))
    return total.div_(experts)


CONSENSUS["mean"] = _mean
register_merge_method(
    "masked_mean", "SoTU's random masks, masked deltas averaged", MergeRule("random", "mean", False)
)
