"""Spherical k-means (faiss) trained on a sample, nearest-centroid assignment streamed in
blocks with the per-cluster statistics, quality pruning, and Ward merging into super-clusters."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.mix.config import ClusterConfig
from forgetless.mix.engine import nearest_centroids, ray_assign
from forgetless.mix.quality import passing
from forgetless.shards import row_blocks

logger = logging.getLogger(__name__)

# Rows per block of a streamed pass: 25 MB of 384-dimensional float32 embeddings.
ASSIGN_ROWS = 16384


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


def kmeans_sample(count: int, k: int, points_per_centroid: int, seed: int) -> np.ndarray:
    """Rows k-means is trained on, ascending: a seeded sample of ``points_per_centroid * k``
    rows, or every row of a smaller pool."""
    size = points_per_centroid * k
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def gather_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``vectors[rows]`` (ascending rows) as float32, read block by block."""
    gathered = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
    for start, block in row_blocks(vectors, ASSIGN_ROWS):
        low, high = np.searchsorted(rows, [start, start + len(block)])
        gathered[low:high] = block[rows[low:high] - start]
    return gathered


def train_centroids(
    vectors: np.ndarray, k: int, iterations: int, seed: int, points_per_centroid: int
) -> np.ndarray:
    """Unit centroids of spherical k-means trained on a seeded sample of the rows."""
    import faiss

    if len(vectors) < k:
        raise ForgetlessError(f"cannot make {k} clusters of {len(vectors)} documents")
    data = gather_rows(vectors, kmeans_sample(len(vectors), k, points_per_centroid, seed))
    kmeans = faiss.Kmeans(
        data.shape[1],
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        verbose=False,
        # faiss would subsample again past 256 points per centroid; the sample is drawn above.
        max_points_per_centroid=(len(data) + k - 1) // k,
    )
    kmeans.train(data)
    return kmeans.centroids.copy()


def streamed_assignment(
    vectors: np.ndarray, centroids: np.ndarray, engine: str = "local"
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, nearest centroid of each row)`` over ``vectors`` in row order, a block at
    a time: on this process, or on Ray workers reading the rows from the matrix's file."""
    if engine == "ray":
        matrix_file = getattr(vectors, "filename", None)
        if matrix_file is None:
            raise ForgetlessError(
                "the Ray engine reads the embeddings from their file; pass the memory-mapped "
                "matrix (forgetless.mix.embed.load_embeddings)"
            )
        yield from ray_assign(matrix_file, len(vectors), centroids, ASSIGN_ROWS)
        return
    for start, block in row_blocks(vectors, ASSIGN_ROWS):
        yield start, nearest_centroids(block, centroids)


def spherical_kmeans(
    vectors: np.ndarray, k: int, iterations: int, seed: int, points_per_centroid: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Unit centroids, trained on a seeded sample, and the nearest centroid of every row."""
    centroids = train_centroids(vectors, k, iterations, seed, points_per_centroid)
    assignment = np.empty(len(vectors), dtype=np.int64)
    for start, clusters in streamed_assignment(vectors, centroids):
        assignment[start : start + len(clusters)] = clusters
    return centroids, assignment


@dataclass
class ClusterStatistics:
    """Per-cluster sums gathered while the documents are assigned: all that pruning needs."""

    sizes: np.ndarray  # (k,) documents
    undropped: np.ndarray  # (k,) documents that passed every document threshold
    score_sums: dict[str, np.ndarray]  # scorer -> (k,) sum of finite scores
    score_counts: dict[str, np.ndarray]  # scorer -> (k,) finite scores

    @classmethod
    def empty(cls, k: int, scorers) -> ClusterStatistics:
        return cls(
            np.zeros(k, dtype=np.int64),
            np.zeros(k, dtype=np.int64),
            {name: np.zeros(k) for name in scorers},
            {name: np.zeros(k, dtype=np.int64) for name in scorers},
        )

    def add(self, clusters: np.ndarray, scores: dict[str, np.ndarray], dropped: np.ndarray):
        k = len(self.sizes)
        self.sizes += np.bincount(clusters, minlength=k)
        self.undropped += np.bincount(clusters[~dropped], minlength=k)
        for name, values in scores.items():
            finite = np.isfinite(values)
            self.score_sums[name] += np.bincount(
                clusters[finite], weights=values[finite], minlength=k
            )
            self.score_counts[name] += np.bincount(clusters[finite], minlength=k)

    def means(self) -> dict[str, np.ndarray]:
        """Scorer -> (k,) mean finite score per cluster (NaN for a cluster with none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                name: np.where(counts > 0, self.score_sums[name] / np.maximum(counts, 1), np.nan)
                for name, counts in self.score_counts.items()
            }


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


def dropped_documents(
    count: int, scores: dict[str, np.ndarray], document_thresholds: dict[str, float] | None
) -> np.ndarray:
    """(n,) bool: the document fails one of the thresholds applied to each document."""
    dropped = np.zeros(count, dtype=bool)
    for name, threshold in (document_thresholds or {}).items():
        dropped |= ~passing(name, scores[name], threshold)
    return dropped


def assign_and_count(
    embeddings: np.ndarray,
    centroids: np.ndarray,
    scores: dict[str, np.ndarray],
    dropped: np.ndarray,
    engine: str = "local",
) -> tuple[np.ndarray, ClusterStatistics]:
    """One streamed pass: the nearest centroid of every document, and the statistics of
    every cluster."""
    assignment = np.empty(len(embeddings), dtype=np.int64)
    statistics = ClusterStatistics.empty(len(centroids), scores)
    for start, clusters in streamed_assignment(embeddings, centroids, engine):
        rows = slice(start, start + len(clusters))
        assignment[rows] = clusters
        statistics.add(clusters, {name: v[rows] for name, v in scores.items()}, dropped[rows])
    return assignment, statistics


def prune_and_merge(
    centroids: np.ndarray,
    statistics: ClusterStatistics,
    config: ClusterConfig,
    thresholds: dict[str, float],
    document_thresholds: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, super_of_cluster)`` of every cluster, from its statistics and centroid only."""
    cluster_scores = statistics.means()
    # A cluster all of whose documents were dropped has nothing left to weigh.
    kept = statistics.undropped > 0
    for name, threshold in thresholds.items():
        kept &= passing(name, cluster_scores[name], threshold)
    if not kept.any():
        raise ForgetlessError(
            f"every cluster was pruned; loosen mix.quality.thresholds ({thresholds}) or "
            f"document_thresholds ({document_thresholds or {}})"
        )
    super_of_cluster = np.full(len(centroids), -1, dtype=np.int64)
    super_of_cluster[kept] = ward_super_clusters(
        centroids[kept], config.merge_distance, config.super_clusters
    )
    return kept, super_of_cluster


def cluster_corpus(
    embeddings: np.ndarray,
    scores: dict[str, np.ndarray],
    config: ClusterConfig,
    thresholds: dict[str, float],
    seed: int,
    engine: str = "local",
    document_thresholds: dict[str, float] | None = None,
) -> Clustering:
    """k-means on a sample, then one streamed pass that assigns every document and gathers
    the cluster statistics; pruning and Ward merging use the statistics and centroids only.
    ``embeddings`` may be memory-mapped: it is read a block at a time."""
    k = effective_k(len(embeddings), config)
    centroids = train_centroids(
        embeddings, k, config.kmeans_iterations, seed, config.kmeans_points_per_centroid
    )
    dropped = dropped_documents(len(embeddings), scores, document_thresholds)
    assignment, statistics = assign_and_count(embeddings, centroids, scores, dropped, engine)
    kept, super_of_cluster = prune_and_merge(
        centroids, statistics, config, thresholds, document_thresholds
    )
    return Clustering(centroids, assignment, statistics.means(), kept, super_of_cluster, dropped)
