"""Data mixtures (CLIMB): embed a pool, cluster it, prune low-quality clusters, merge the
rest into super-clusters; then search mixture weights over them with proxy models.

* :func:`run_clustering` — pool -> super-clusters with a report, cached and resumable;
* :func:`run_mixture_search` — the iterative search over super-cluster weights;
* :func:`materialise_mixture` — a training set of N tokens drawn by the found weights.
"""

from forgetless.mix.stages import materialise_mixture, run_clustering, run_mixture_search

__all__ = ["materialise_mixture", "run_clustering", "run_mixture_search"]
