"""Merging fine-tuned experts: SoTU sparse orthogonal deltas, with task arithmetic, TIES and
DARE as baselines behind the same streaming, deterministic API.

* :func:`merge_checkpoints` (``merge.merger``) — experts -> one checkpoint, tensor by tensor;
* :mod:`forgetless.merge.rules` — the registered methods as sparsifier + rescale + consensus;
* :mod:`forgetless.merge.methods` — the components' tensor code.
"""

MERGE_REPORT = "merge_report.json"


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for its config) must not import torch.
    if name in ("MergeReport", "merge_checkpoints"):
        from forgetless.merge import merger

        return getattr(merger, name)
    raise AttributeError(name)


__all__ = ["MERGE_REPORT", "MergeReport", "merge_checkpoints"]
