"""Data mixtures (CLIMB): embed a pool, cluster it, prune low-quality clusters, merge the
rest into super-clusters; then search mixture weights over them with proxy models.

* :func:`run_clustering` (``mix.stages``) — pool -> super-clusters with a report, resumable;
* :func:`run_mixture_search` — the iterative search over super-cluster weights;
* :func:`materialise_mixture` — a training set of N tokens drawn by the found weights;
* :mod:`forgetless.mix.methods` — the registered mixtures (climb, uniform, natural).
"""

_STAGE_FUNCTIONS = ("materialise_mixture", "run_clustering", "run_mixture_search")


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for its config) must not import the clustering code.
    if name in _STAGE_FUNCTIONS:
        from forgetless.mix import stages

        return getattr(stages, name)
    raise AttributeError(name)


__all__ = list(_STAGE_FUNCTIONS)
