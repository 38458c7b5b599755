"""Data mixtures (CLIMB): embed a pool, cluster it, prune low-quality clusters, merge the
rest into super-clusters; then search mixture weights over them with proxy models.

* :func:`run_clustering` — pool -> super-clusters with a report, cached and resumable.
"""

from forgetless.mix.stages import run_clustering

__all__ = ["run_clustering"]
