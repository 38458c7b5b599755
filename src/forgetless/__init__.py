"""forgetless: domain and continual adaptation of causal LMs without catastrophic forgetting."""

__version__ = "0.1.0"
