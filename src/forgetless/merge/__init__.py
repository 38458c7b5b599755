"""Merging fine-tuned experts: SoTU sparse orthogonal deltas, with task arithmetic, TIES and
DARE as baselines behind the same streaming, deterministic API."""

from forgetless.merge.merger import MERGE_REPORT, MergeReport, merge_checkpoints

__all__ = ["MERGE_REPORT", "MergeReport", "merge_checkpoints"]
