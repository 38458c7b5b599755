"""Training data selection: Orthogonal Gradient Selection (OGS) and its baselines.

* :func:`run_selection` (``select.stages``) — pool -> selected subset, cached and resumable;
* :mod:`forgetless.select.methods` — the registered methods and how each ranks the pool;
* :mod:`forgetless.select.gradients` — batched, projected per-sample gradient features;
* :mod:`forgetless.select.metrics` — anchor subspace, orthogonality, conflict, utility;
* :mod:`forgetless.select.navigator` — the Navigator and its constrained-RL training;
* :mod:`forgetless.select.criterion` — whether a cost predicts forgetting: arms matched on
  utility and tokens, and what a subset is predicted to cost.
"""

from forgetless.select.report import SELECTED_FILE


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for its config) must not import torch.
    if name == "run_selection":
        from forgetless.select.stages import run_selection

        return run_selection
    raise AttributeError(name)


__all__ = ["SELECTED_FILE", "run_selection"]
