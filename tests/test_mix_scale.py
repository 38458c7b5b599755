"""Million-document pools: k-means on a seeded sample, nearest-centroid assignment streamed in
blocks with the cluster statistics, texts read from disk on demand, resident memory bounded
to a block, and the scale benchmark's smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgetless.mix import cluster as cluster_module
from forgetless.mix.cluster import (
    assign_and_count,
    cluster_corpus,
    kmeans_sample,
    train_centroids,
)
from forgetless.mix.config import ClusterConfig
from forgetless.mix.corpus import TextFile
from forgetless.shards import ShardedRows, load_sharded_rows, row_blocks

ROOT = Path(__file__).resolve().parents[1]


def _unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _memmap(tmp_path: Path, rows: np.ndarray) -> np.ndarray:
    np.save(tmp_path / "matrix.npy", rows)
    return np.load(tmp_path / "matrix.npy", mmap_mode="r")


def test_streamed_assignment_equals_a_full_search(tmp_path, monkeypatch):
    vectors = _memmap(tmp_path, _unit_rows(3000, 16))
    centroids = _unit_rows(25, 16, seed=1)
    scores = {"rules": np.random.default_rng(2).uniform(size=3000)}
    scores["rules"][::50] = np.nan  # a non-finite score counts for nothing
    dropped = scores["rules"] < 0.1
    monkeypatch.setattr(cluster_module, "ASSIGN_ROWS", 128)  # 24 blocks, the last one short
    assignment, statistics = assign_and_count(vectors, centroids, scores, dropped)

    full = np.argmax(np.asarray(vectors) @ centroids.T, axis=1)
    assert np.array_equal(assignment, full)
    assert np.array_equal(statistics.sizes, np.bincount(full, minlength=25))
    assert np.array_equal(statistics.undropped, np.bincount(full[~dropped], minlength=25))
    finite = np.isfinite(scores["rules"])
    means = np.bincount(full[finite], weights=scores["rules"][finite], minlength=25)
    means /= np.bincount(full[finite], minlength=25)
    np.testing.assert_allclose(statistics.means()["rules"], means, rtol=1e-12)


def test_kmeans_trains_on_a_seeded_sample_and_small_pools_on_every_row():
    vectors = _unit_rows(2000, 8)
    sample = kmeans_sample(2000, k=10, points_per_centroid=20, seed=0)
    assert len(sample) == 200 and len(set(sample.tolist())) == 200
    assert np.array_equal(sample, np.sort(sample))
    assert np.array_equal(sample, kmeans_sample(2000, 10, 20, seed=0))
    assert not np.array_equal(sample, kmeans_sample(2000, 10, 20, seed=1))
    assert np.array_equal(kmeans_sample(150, 10, 20, seed=0), np.arange(150))

    first = train_centroids(vectors, 10, iterations=10, seed=0, points_per_centroid=20)
    again = train_centroids(vectors, 10, iterations=10, seed=0, points_per_centroid=20)
    other = train_centroids(vectors, 10, iterations=10, seed=1, points_per_centroid=20)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # The sample is what k-means sees: training on those rows alone gives the same centroids.
    alone = train_centroids(vectors[sample], 10, iterations=10, seed=0, points_per_centroid=20)
    np.testing.assert_array_equal(first, alone)


def test_clustering_a_memory_mapped_pool_matches_the_in_memory_one(tmp_path, monkeypatch):
    rows = _unit_rows(1500, 12)
    scores = {"rules": np.random.default_rng(3).uniform(size=1500)}
    config = ClusterConfig(clusters=12, kmeans_points_per_centroid=50)
    in_memory = cluster_corpus(rows, scores, config, {"rules": 0.3}, seed=0)
    monkeypatch.setattr(cluster_module, "ASSIGN_ROWS", 100)
    mapped = cluster_corpus(_memmap(tmp_path, rows), scores, config, {"rules": 0.3}, seed=0)
    for field in ("centroids", "assignment", "kept", "super_of_cluster", "dropped"):
        assert np.array_equal(getattr(mapped, field), getattr(in_memory, field)), field


def test_a_text_file_is_read_in_slices_and_streamed(tmp_path):
    texts = [f"document {i}\nwith a newline and \u2028 a separator" for i in range(10)]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    pool = TextFile(path)
    assert len(pool) == 10 and list(pool) == texts
    assert pool[3:7] == texts[3:7] and pool[-1] == texts[-1] and pool[8:20] == texts[8:]
    prefix = TextFile(path, limit=4)
    assert len(prefix) == 4 and list(prefix) == texts[:4] and prefix[2:] == texts[2:4]


def test_sharded_rows_keep_a_digest_of_the_ids_and_resume(tmp_path):
    store = ShardedRows(tmp_path, ["a", "b", "c"], {"x": 1}, 2, 4, np.float32, {})
    store.matrix[0:2] = 1.0
    store.commit(0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["count"] == 3 and isinstance(manifest["ids"], str)
    resumed = ShardedRows(tmp_path, ["a", "b", "c"], {"x": 1}, 2, 4, np.float32, {})
    assert resumed.pending() == [(1, 2, 3)]
    resumed.matrix[2:3] = 2.0
    resumed.commit(1)
    ids, matrix, _ = load_sharded_rows(tmp_path)
    assert ids == ["a", "b", "c"] and matrix[:, 0].tolist() == [1.0, 1.0, 2.0]
    # Other ids start over.
    assert ShardedRows(tmp_path, ["a", "b", "d"], {"x": 1}, 2, 4, np.float32, {}).done == 0
    numbered = ShardedRows(tmp_path / "n", 3, {"x": 1}, 2, 4, np.float32, {})
    for shard, _, _ in numbered.pending():
        numbered.commit(shard)
    assert load_sharded_rows(tmp_path / "n")[0] == ["0", "1", "2"]


def _peak_rss_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def test_a_streamed_pass_keeps_one_block_resident(tmp_path):
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    matrix = _memmap(tmp_path, np.ones((64 * 1024, 256), dtype=np.float32))  # 64 MiB
    clear_refs.write_text("5")
    before = _peak_rss_kb()
    total = sum(float(block[:, 0].sum()) for _, block in row_blocks(matrix, 4096))  # 4 MiB
    assert total == 64 * 1024
    assert _peak_rss_kb() - before < 24 * 1024  # without releasing the pages: 64 MiB more


@pytest.mark.slow
@pytest.mark.heavy
def test_the_scale_benchmark_runs_in_quick_mode(tmp_path, shared_data_dir):
    finished = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mix_scale.py"), "--quick"]
        + ["--work-dir", str(tmp_path), "--data-dir", str(shared_data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Growth" in finished.stdout and "prune+merge" in finished.stdout
    results = json.loads((tmp_path / "results" / "minilm-static-local.json").read_text())
    assert sorted(map(int, results)) == [300, 1000]
    assert all(result["passes"][-1]["pass"] == "prune+merge" for result in results.values())
