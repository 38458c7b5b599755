"""Mixture search, clustering half: quality scores, spherical k-means, pruning, Ward merge,
and the clustering run on real text."""

import csv
import json

import numpy as np
import pytest

from forgetless.config import MixConfig, load_config
from forgetless.errors import ForgetlessError
from forgetless.mix.cluster import cluster_corpus, spherical_kmeans, ward_super_clusters
from forgetless.mix.quality import heuristic_score


def test_heuristic_score_separates_prose_from_junk():
    prose = (
        "The committee reviewed the proposal in detail and asked the authors to clarify how "
        "the trial participants were recruited, how consent was obtained, and which outcomes "
        "were chosen before the data were collected and analysed by the independent team."
    )
    assert heuristic_score(prose) > 0.9
    assert heuristic_score("12 34 56 78 90 %% ## 11 22 33") < 0.5
    assert heuristic_score("buy now " * 40) < heuristic_score(prose)
    assert heuristic_score("") == 0.0


def _blobs(directions, per_blob=30, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for direction in directions:
        points = direction + noise * rng.normal(size=(per_blob, len(direction)))
        rows.append(points / np.linalg.norm(points, axis=1, keepdims=True))
    return np.concatenate(rows).astype(np.float32)


def test_spherical_kmeans_recovers_blobs_deterministically():
    vectors = _blobs(np.eye(8)[:3])
    centroids, assignment = spherical_kmeans(vectors, 3, iterations=20, seed=0)
    again = spherical_kmeans(vectors, 3, iterations=20, seed=0)
    assert np.array_equal(assignment, again[1]) and np.array_equal(centroids, again[0])
    blocks = assignment.reshape(3, 30)
    assert all(len(set(block)) == 1 for block in blocks)
    assert len({block[0] for block in blocks}) == 3
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)


def test_ward_merges_close_centroids_only():
    close = np.array([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 0.0, 1.0]])
    assert ward_super_clusters(close, distance=0.5).tolist() == [0, 0, 1]
    assert ward_super_clusters(close, distance=5.0).tolist() == [0, 0, 0]


def test_low_quality_clusters_are_pruned():
    vectors = _blobs(np.eye(8)[:4], per_blob=20)
    quality = np.repeat([0.9, 0.9, 0.2, 0.9], 20)
    config = MixConfig(clusters=4, quality_thresholds={"heuristic": 0.5}, merge_distance=0.1)
    clustering = cluster_corpus(vectors, {"heuristic": quality}, config)
    groups = clustering.document_super.reshape(4, 20)
    assert (groups[2] == -1).all()
    assert all((row >= 0).all() and len(set(row)) == 1 for row in groups[[0, 1, 3]])
    assert clustering.super_count == 3
    with pytest.raises(ForgetlessError, match="every cluster was pruned"):
        cluster_corpus(vectors, {"heuristic": quality * 0}, config)


def test_clustering_run_on_real_text(tmp_path, shared_data_dir):
    from forgetless.mix import run_clustering

    config = load_config(
        None,
        {
            "mix.sources": ["c4", "pubmedqa@train", "eurlex@train"],
            "mix.limit_per_source": 20,
            "mix.clusters": 12,
            "mix.quality_thresholds": {"heuristic": 0.3, "perplexity": 1e9},
            "mix.reference_model": "tiny-llama",
            "mix.perplexity_max_length": 64,
        },
    )
    results = run_clustering(config, tmp_path / "run", progress=False)
    summary = results["clusters"].summary
    assert summary["documents"] == 60 and summary["clusters"] == 12
    assert 1 <= summary["super_clusters"] <= summary["kept_clusters"]
    directory = results["clusters"].directory
    with open(directory / "assignments.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60 and rows[0]["source"] == "c4"
    report = json.loads((directory / "report.json").read_text())
    assert (
        sum(cluster["documents"] for cluster in report["super_clusters"])
        == 60 - report["pruned_documents"]
    )
    # Legal acts are unlike the rest: some super-cluster is mostly EUR-Lex.
    assert any(
        cluster["sources"].get("eurlex@train", 0) > cluster["documents"] / 2
        for cluster in report["super_clusters"]
    )
    assert "| super-cluster |" in (directory / "report.md").read_text()
    scores = np.load(results["quality"].directory / "scores.npz")
    assert np.isfinite(scores["perplexity"]).all() and (scores["perplexity"] > 1).all()
    again = run_clustering(config, tmp_path / "run", progress=False)
    assert all(result.cached for result in again.values())
