"""Training data selection: Orthogonal Gradient Selection (OGS) and its baselines.

* :func:`run_selection` — pool -> selected subset, cached and resumable in a directory;
* :mod:`forgetless.select.gradients` — batched, projected per-sample gradient features;
* :mod:`forgetless.select.metrics` — anchor subspace, orthogonality, conflict, utility;
* :mod:`forgetless.select.navigator` — the Navigator and its constrained-RL training.
"""

from forgetless.select.selection import SELECTED_FILE, run_selection, selected_records

__all__ = ["SELECTED_FILE", "run_selection", "selected_records"]
