"""Spherical k-means (faiss), quality pruning, and Ward merging into super-clusters."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.mix.config import ClusterConfig
from forgetless.mix.quality import passes

logger = logging.getLogger(__name__)


@dataclass
class Clustering:
    centroids: np.ndarray  # (k, dim), unit rows
    assignment: np.ndarray  # (n,) fine cluster of each document
    cluster_scores: dict[str, np.ndarray]  # scorer -> (k,) mean score per fine cluster
    kept: np.ndarray  # (k,) bool
    super_of_cluster: np.ndarray  # (k,) super-cluster id, -1 for pruned clusters
    dropped: np.ndarray  # (n,) bool: the document failed a document threshold

    @property
    def document_super(self) -> np.ndarray:
        """(n,) super-cluster of each document, -1 where it or its cluster was pruned."""
        return np.where(self.dropped, -1, self.super_of_cluster[self.assignment])

    @property
    def sizes(self) -> np.ndarray:
        """(k,) documents per fine cluster."""
        return np.bincount(self.assignment, minlength=len(self.kept))

    @property
    def super_count(self) -> int:
        return int(self.super_of_cluster.max()) + 1 if self.kept.any() else 0


def effective_k(documents: int, config: ClusterConfig) -> int:
    if config.clusters == "auto":
        return max(2, documents // config.docs_per_cluster)
    k = min(config.clusters, max(2, documents // config.min_cluster_size))
    if k < config.clusters:
        logger.warning(
            "mix.cluster.clusters=%d is too many for %d documents; using k=%d "
            "(min_cluster_size=%d)",
            config.clusters,
            documents,
            k,
            config.min_cluster_size,
        )
    return k


def describe_k(documents: int, config: ClusterConfig, k: int) -> str:
    """How k was set, for the report."""
    if config.clusters == "auto":
        return f"k = {k}: auto, {documents} documents // {config.docs_per_cluster} per cluster"
    if k < config.clusters:
        return f"k = {k}: {config.clusters} lowered to documents // {config.min_cluster_size}"
    return f"k = {k}: set"


def spherical_kmeans(
    vectors: np.ndarray, k: int, iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit centroids and the nearest centroid (by cosine) of every row."""
    import faiss

    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(data) < k:
        raise ForgetlessError(f"cannot make {k} clusters of {len(data)} documents")
    kmeans = faiss.Kmeans(
        data.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False
    )
    # faiss subsamples to 256 points per centroid by default; keep every point.
    kmeans.max_points_per_centroid = max(256, (len(data) + k - 1) // k)
    kmeans.train(data)
    _, nearest = kmeans.index.search(data, 1)
    return kmeans.centroids.copy(), nearest[:, 0].astype(np.int64)


def cluster_means(assignment: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Mean of finite ``values`` per cluster (NaN for a cluster with none)."""
    finite = np.isfinite(values)
    sums = np.bincount(assignment[finite], weights=values[finite], minlength=k)
    counts = np.bincount(assignment[finite], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def ward_super_clusters(
    centroids: np.ndarray, distance: float, cap: int | None = None
) -> np.ndarray:
    """Super-cluster id of each centroid, numbered by first appearance (0, 1, ...).

    The Ward tree is cut at ``distance``, or higher where that leaves more than ``cap``
    super-clusters.
    """
    if len(centroids) == 1:
        return np.zeros(1, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage

    tree = linkage(centroids, method="ward")
    labels = fcluster(tree, t=distance, criterion="distance")
    if cap is not None and labels.max() > cap:
        labels = fcluster(tree, t=cap, criterion="maxclust")
    order: dict[int, int] = {}
    return np.array([order.setdefault(label, len(order)) for label in labels], dtype=np.int64)


def cluster_corpus(
    embeddings: np.ndarray,
    scores: dict[str, np.ndarray],
    config: ClusterConfig,
    thresholds: dict[str, float],
    seed: int,
    engine: str = "local",
    document_thresholds: dict[str, float] | None = None,
) -> Clustering:
    k = effective_k(len(embeddings), config)
    centroids, assignment = spherical_kmeans(embeddings, k, config.kmeans_iterations, seed)
    if engine == "ray":
        from forgetless.mix.engine import ray_assign

        assignment = ray_assign(embeddings, centroids)
    cluster_scores = {name: cluster_means(assignment, values, k) for name, values in scores.items()}
    dropped = np.zeros(len(assignment), dtype=bool)
    for name, threshold in (document_thresholds or {}).items():
        dropped |= ~np.array([passes(name, value, threshold) for value in scores[name]])
    # A cluster all of whose documents were dropped has nothing left to weigh.
    kept = np.bincount(assignment[~dropped], minlength=k) > 0
    for name, threshold in thresholds.items():
        kept &= np.array([passes(name, value, threshold) for value in cluster_scores[name]])
    if not kept.any():
        raise ForgetlessError(
            f"every cluster was pruned; loosen mix.quality.thresholds ({thresholds}) or "
            f"document_thresholds ({document_thresholds or {}})"
        )
    super_of_cluster = np.full(k, -1, dtype=np.int64)
    super_of_cluster[kept] = ward_super_clusters(
        centroids[kept], config.merge_distance, config.super_clusters
    )
    return Clustering(centroids, assignment, cluster_scores, kept, super_of_cluster, dropped)
