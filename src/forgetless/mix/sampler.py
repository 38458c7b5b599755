"""Materialising a training set from mixture weights over super-clusters."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    documents: np.ndarray  # document indices, shuffled; a document may repeat
    tokens_per_cluster: np.ndarray  # tokens drawn from each super-cluster
    short_clusters: list[int]  # clusters that hit the repetition cap


def sample_mixture(
    document_tokens: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray,
    total_tokens: int,
    *,
    repetition_cap: float,
    seed: int,
) -> Sample:
    """Documents whose tokens follow ``weights`` over super-clusters, ``total_tokens`` in
    expectation.

    Each super-cluster is read in a fresh random order per pass, so every document is used
    once before any repeats; a cluster's tokens are capped at ``repetition_cap`` times what
    it holds (a warning says so), so a tiny cluster with a large weight cannot flood the set.
    """
    rng = np.random.default_rng(seed)
    weights = np.asarray(weights, dtype=np.float64)
    chosen: list[np.ndarray] = []
    drawn = np.zeros(len(weights))
    short: list[int] = []
    for cluster, weight in enumerate(weights):
        members = np.flatnonzero(groups == cluster)
        if weight <= 0 or len(members) == 0:
            continue
        available = float(document_tokens[members].sum())
        wanted = weight * total_tokens
        if wanted > repetition_cap * available:
            short.append(cluster)
            wanted = repetition_cap * available
        picked: list[int] = []
        count = 0.0
        while count < wanted:
            # Whole documents that fit the cluster's remaining budget, in a fresh random order
            # per pass (a pass ends when none fits). The remainder is settled by one more
            # document kept with probability remainder / its length, so a cluster of long
            # documents gets its share in expectation instead of all or nothing.
            added, leftover = False, None
            for document in rng.permutation(members).tolist():
                length = float(document_tokens[document])
                if count + length <= wanted:
                    picked.append(document)
                    count += length
                    added = True
                elif leftover is None:
                    leftover = document
            if not added:
                if leftover is not None:
                    length = float(document_tokens[leftover])
                    if rng.random() < (wanted - count) / length:
                        picked.append(leftover)
                        count += length
                break
        chosen.append(np.array(picked, dtype=np.int64))
        drawn[cluster] = count
    if short:
        logger.warning(
            "super-clusters %s hold too few tokens for their weight at repetition_cap; "
            "they are under-represented",
            short,
        )
    documents = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return Sample(rng.permutation(documents), drawn, short)
