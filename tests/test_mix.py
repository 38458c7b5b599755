"""Mixture search, clustering half: quality scores, spherical k-means, pruning, Ward merge,
and the clustering run on real text."""

import csv
import json

import numpy as np
import pytest

from forgetless.config import load_config
from forgetless.errors import ForgetlessError
from forgetless.mix.cluster import cluster_corpus, spherical_kmeans, ward_super_clusters
from forgetless.mix.config import ClusterConfig, SearchConfig
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
    # A cap cuts the same tree higher when the distance leaves more, and only then.
    assert ward_super_clusters(close, distance=0.01, cap=2).tolist() == [0, 0, 1]
    assert ward_super_clusters(close, distance=0.01, cap=1).tolist() == [0, 0, 0]
    assert ward_super_clusters(close, distance=0.5, cap=5).tolist() == [0, 0, 1]


def test_low_quality_clusters_are_pruned():
    vectors = _blobs(np.eye(8)[:4], per_blob=20)
    quality = np.repeat([0.9, 0.9, 0.2, 0.9], 20)
    config = ClusterConfig(clusters=4, merge_distance=0.1)
    thresholds = {"heuristic": 0.5}
    clustering = cluster_corpus(vectors, {"heuristic": quality}, config, thresholds, seed=0)
    groups = clustering.document_super.reshape(4, 20)
    assert (groups[2] == -1).all()
    assert all((row >= 0).all() and len(set(row)) == 1 for row in groups[[0, 1, 3]])
    assert clustering.super_count == 3
    with pytest.raises(ForgetlessError, match="every cluster was pruned"):
        cluster_corpus(vectors, {"heuristic": quality * 0}, config, thresholds, seed=0)


def test_clustering_run_on_real_text(tmp_path, shared_data_dir):
    from forgetless.mix import run_clustering

    config = load_config(
        None,
        {
            "mix.sources": ["c4", "pubmedqa@train", "eurlex@train"],
            "mix.limit_per_source": 20,
            "mix.cluster.clusters": 12,
            "mix.quality.thresholds": {"heuristic": 0.3, "perplexity": 1e9},
            "mix.quality.perplexity.reference_model": "tiny-llama",
            "mix.quality.perplexity.max_length": 64,
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


# --- the search --------------------------------------------------------------------------


def test_dirichlet_draws_are_distinct_capped_mixtures():
    from forgetless.mix.search import dirichlet_draws, prior_from_tokens

    prior = prior_from_tokens(np.array([1000.0, 100.0, 10.0, 1.0]))
    assert prior[0] > prior[1] > prior[2] > prior[3]
    config = SearchConfig(weight_cap=3.0)
    draws = dirichlet_draws(prior, 200, np.random.default_rng(0), config)
    assert draws.shape == (200, 4)
    np.testing.assert_allclose(draws.sum(1), 1.0, atol=1e-9)
    assert (draws <= 3.0 * prior + 1e-3).all()
    assert len({row.tobytes() for row in np.round(draws, 4)}) == 200
    again = dirichlet_draws(prior, 200, np.random.default_rng(0), config)
    assert np.array_equal(draws, again)


def test_sampler_follows_weights_and_caps_repetition():
    from forgetless.mix.sampler import sample_mixture

    groups = np.repeat([0, 1, 2], [50, 50, 5])
    tokens = np.full(105, 100.0)
    sample = sample_mixture(tokens, groups, [0.5, 0.3, 0.2], 6000, repetition_cap=2.0, seed=0)
    assert sample.tokens_per_cluster.tolist() == [3000.0, 1800.0, 1000.0]
    assert sample.short_clusters == [2]  # 5 documents x 100 tokens x 2 passes at most
    counts = np.bincount(sample.documents, minlength=105)
    assert counts[:100].max() == 1 and counts[100:].max() == 2
    repeat = sample_mixture(tokens, groups, [0.5, 0.3, 0.2], 6000, repetition_cap=2.0, seed=0)
    assert np.array_equal(sample.documents, repeat.documents)
    # A share that is not a whole number of documents is met in expectation.
    drawn = [
        sample_mixture(
            tokens, groups, [0.25, 0.75, 0.0], 1000, repetition_cap=2.0, seed=seed
        ).tokens_per_cluster[0]
        for seed in range(200)
    ]
    assert set(drawn) == {200.0, 300.0} and abs(np.mean(drawn) - 250) < 15


def _synthetic_objective(optimum):
    calls = []

    def runner(weights, workdir, seed=None):
        calls.append(weights)
        return {"objective": float(np.abs(weights - optimum).sum()), "task": 0.0}

    return runner, calls


def test_search_finds_a_better_mixture_and_resumes(tmp_path, caplog):
    from forgetless.mix.search import run_search

    prior = np.full(5, 0.2)
    optimum = np.array([0.6, 0.25, 0.1, 0.05, 0.0])
    runner, calls = _synthetic_objective(optimum)
    config = SearchConfig(
        rounds=[24, 12, 12], candidates=5000, predictor_iterations=300, noise_runs=0
    )
    with caplog.at_level("WARNING", logger="forgetless.mix.search"):
        outcome = run_search(config, 0, prior, tmp_path, runner, progress=False)
    # 48 proxy runs in the rounds, then the two final candidates under 3 fresh seeds each.
    assert outcome["status"] == "done" and len(calls) == 48 + 6
    assert "no better than chance" not in caplog.text  # the predictor has learnt it
    first, later = outcome["rounds"][0], outcome["rounds"][1:]
    # Rounds guided by the predictor propose better mixtures than the Dirichlet prior does.
    assert all(entry["mean_objective"] < first["mean_objective"] for entry in later)
    final = np.array(outcome["final"]["weights"])
    assert np.abs(final - optimum).sum() < np.abs(prior - optimum).sum()
    assert "spearman_held_out" in later[0]
    # Out-of-fold over every run so far, the predictor ranks this learnable objective well,
    # and better as runs accumulate (0.76, 0.83, 0.96).
    spearman = [entry["spearman_cross_validated"] for entry in outcome["rounds"]]
    assert all(value > 0.7 for value in spearman) and spearman[-1] > 0.9
    again = run_search(config, 0, prior, tmp_path, runner, progress=False)
    assert len(calls) == 54 and again["final"] == outcome["final"]
    # On a smooth objective the predictor's top-k mean beats the best single run it saw.
    assert outcome["final"]["chosen"] == "predicted"


def test_a_predictor_without_signal_is_said(tmp_path, caplog):
    from forgetless.mix.search import run_search

    noise = np.random.default_rng(0)

    def runner(weights, workdir, seed=None):
        # Pure noise: no mixture is better than another, so nothing can be learnt.
        return {"objective": float(noise.normal()), "task": 0.0}

    config = SearchConfig(rounds=[16, 8], candidates=500, predictor_iterations=50, noise_runs=0)
    with caplog.at_level("WARNING", logger="forgetless.mix.search"):
        run_search(config, 0, np.full(5, 0.2), tmp_path, runner, progress=False)
    assert "no better than chance at 24 runs" in caplog.text


def test_search_with_proxies_run_elsewhere(tmp_path):
    import csv as csv_module

    from forgetless.mix.search import METRICS_FILE, MIXTURES_FILE, REFERENCE_FILE, run_search

    config = SearchConfig(rounds=[6, 4], candidates=500, predictor_iterations=50, noise_runs=2)
    prior = np.full(3, 1 / 3)
    waiting = run_search(config, 0, prior, tmp_path, None, progress=False)
    # The reference runs (one per proxy seed) wait with round 1's proposals.
    assert waiting["status"] == "waiting" and len(waiting["pending"]) == 2 + 6
    with open(tmp_path / MIXTURES_FILE) as handle:
        proposed = list(csv_module.DictReader(handle))
    with open(tmp_path / REFERENCE_FILE) as handle:
        references = list(csv_module.DictReader(handle))
    assert [row["seed"] for row in references] == ["0", "1"]
    assert waiting["pending"] == [row["id"] for row in references + proposed]
    with open(tmp_path / METRICS_FILE, "w", newline="") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["id", "objective"])
        for row in proposed + references:
            writer.writerow([row["id"], float(row["w0"]) + 0.01 * float(row.get("seed", 0))])
    second = run_search(config, 0, prior, tmp_path, None, progress=False)
    assert second["status"] == "waiting" and second["step"] == "round 2"
    assert len(second["pending"]) == 4


def test_mixture_search_end_to_end_on_tiny_proxies(tmp_path, shared_data_dir):
    from forgetless.mix import materialise_mixture, run_mixture_search

    config = load_config(
        None,
        {
            "mix.sources": ["c4", "pubmedqa@train", "eurlex@train"],
            "mix.limit_per_source": 15,
            "mix.cluster.clusters": 6,
            "mix.cluster.merge_distance": 0.6,
            "mix.search.rounds": [4, 2],
            "mix.search.candidates": 200,
            "mix.search.predictor_iterations": 20,
            "mix.search.proxy_tokens": 2048,
            "mix.search.proxy_max_length": 32,
            "mix.search.target_limit": 4,
            "mix.search.noise_runs": 2,
            "mix.search.verify_runs": 2,
            "mix.search.constraints": {"ppl:web_pool@validation": 0.05},
        },
    )
    outcome = run_mixture_search(config, tmp_path / "run", progress=False)
    assert outcome["status"] == "done"
    mixture = json.loads((tmp_path / "run" / "search" / "mixture.json").read_text())
    assert abs(sum(mixture["weights"]) - 1) < 1e-6
    assert len(mixture["weights"]) == len(mixture["super_clusters"])
    with open(tmp_path / "run" / "search" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # Six searched mixtures, the natural one under two proxy seeds and the two final
    # candidates under two fresh seeds, each scored on the targets and the constrained task.
    assert len(rows) == 6 + 2 + 2 * 2
    assert mixture["chosen"] in ("predicted", "best_observed")
    chosen = outcome["final"]["verification"][mixture["chosen"]]
    assert chosen["weights"] == mixture["weights"] and chosen["runs"] == 2
    assert "| best observed | 2 |" in (tmp_path / "run" / "search" / "report.md").read_text()
    assert {"objective", "ppl:pubmedqa@test", "ppl:boolq", "ppl:web_pool@validation"} <= set(
        rows[0]
    )
    reference = outcome["reference"]
    assert [run["seed"] for run in reference["runs"]] == [0, 1]
    natural = np.array(outcome["cluster_tokens"]) / sum(outcome["cluster_tokens"])
    np.testing.assert_allclose(reference["weights"], natural, atol=1e-6)
    objectives = [run["objective"] for run in reference["runs"]]
    # Two proxy seeds train two different models on the same mixture.
    assert objectives[0] != objectives[1]
    assert reference["objective"]["std"] == pytest.approx(np.std(objectives, ddof=1), abs=1e-6)
    limit = mixture["constraints"]["ppl:web_pool@validation"]
    assert limit["limit_perplexity"] == pytest.approx(1.05 * limit["reference_perplexity"])
    report = (tmp_path / "run" / "search" / "report.md").read_text()
    assert "Seed noise" in report and "| ppl:web_pool@validation | +5.0% |" in report
    # The docs promise a rerun reports the same mixture: a fresh run directory, same seed.
    run_mixture_search(config, tmp_path / "rerun", progress=False)
    for name in ("metrics.csv", "reference.csv", "mixture.json", "report.md"):
        assert (tmp_path / "rerun" / "search" / name).read_bytes() == (
            tmp_path / "run" / "search" / name
        ).read_bytes()
    summary = materialise_mixture(config, tmp_path / "run", 5000, tmp_path / "data.jsonl")
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    assert len(lines) == summary["documents"] > 0
    drawn = np.array(summary["tokens_per_super_cluster"])
    assert drawn.sum() > 0 and (drawn[np.array(mixture["weights"]) == 0] == 0).all()
    search = config.mix.search.model_copy(update={"rounds": [3]})
    changed = config.model_copy(update={"mix": config.mix.model_copy(update={"search": search})})
    with pytest.raises(ForgetlessError, match="other settings"):
        run_mixture_search(changed, tmp_path / "run", progress=False)


def test_ray_engine_matches_the_local_engine(tmp_path, shared_data_dir):
    ray = pytest.importorskip("ray")
    from forgetless.mix import run_clustering
    from forgetless.mix.embed import load_embeddings

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        outputs = {}
        for engine in ("local", "ray"):
            config = load_config(
                None,
                {
                    "mix.sources": ["c4", "pubmedqa@train"],
                    "mix.limit_per_source": 15,
                    "mix.cluster.clusters": 6,
                    "mix.embed.shard_size": 12,  # several shards: commits happen mid-pass
                    "mix.embed.batch_size": 8,
                    "mix.engine": engine,
                },
            )
            outputs[engine] = run_clustering(config, tmp_path / engine, progress=False)
    finally:
        ray.shutdown()
    local, distributed = (
        np.asarray(load_embeddings(outputs[engine]["embeddings"].directory))
        for engine in ("local", "ray")
    )
    np.testing.assert_allclose(distributed, local, atol=1e-5)
    clusterings = [
        np.load(outputs[engine]["clusters"].directory / "clustering.npz")
        for engine in ("local", "ray")
    ]
    for key in ("assignment", "kept", "super_of_cluster"):
        assert np.array_equal(clusterings[0][key], clusterings[1][key])


# --- files read back from disk, and non-finite numbers --------------------------------------


def test_search_files_read_back_are_checked_line_by_line(tmp_path):
    from forgetless.errors import ForgetlessError
    from forgetless.mix.search import METRICS_FILE, MIXTURES_FILE, SearchFiles

    files = SearchFiles(tmp_path, 2)
    (tmp_path / MIXTURES_FILE).write_text("id,round,w0,w1\n../../escape,0,0.5,0.5\n")
    with pytest.raises(
        ForgetlessError, match=r"mixtures.csv:2: '../../escape' is not a mixture id"
    ):
        files.mixtures()
    (tmp_path / MIXTURES_FILE).write_text("id,round,w0,w1\naaaaaaaaaaaa,0,0.5\n")
    with pytest.raises(ForgetlessError, match=r"mixtures.csv:2: a round and 2 weights"):
        files.mixtures()
    (tmp_path / MIXTURES_FILE).write_text("id,round,w0,w1\naaaaaaaaaaaa,0,nan,0.5\n")
    with pytest.raises(ForgetlessError, match=r"mixtures.csv:2: weights must be finite"):
        files.mixtures()
    (tmp_path / METRICS_FILE).write_text("id,loss\naaaaaaaaaaaa,1.0\n")
    with pytest.raises(ForgetlessError, match=r"metrics.csv:1: no 'objective' column"):
        files.metrics()
    (tmp_path / METRICS_FILE).write_text("id,objective,loss\naaaaaaaaaaaa,1.0\n")
    with pytest.raises(ForgetlessError, match=r"metrics.csv:2: a number expected"):
        files.metrics()
    (tmp_path / METRICS_FILE).write_text("id,objective\naaaaaaaaaaaa,inf\n")
    with pytest.raises(ForgetlessError, match=r"metrics.csv:2: objective inf is not finite"):
        files.metrics()


def test_a_non_finite_proxy_objective_stops_the_search(tmp_path):
    from forgetless.errors import ForgetlessError
    from forgetless.mix.search import prior_from_tokens, run_search

    config = SearchConfig(
        rounds=[4], candidates=50, predictor_iterations=5, noise_runs=0, verify_runs=0
    )
    prior = prior_from_tokens(np.array([3.0, 2.0, 1.0]))
    with pytest.raises(ForgetlessError, match="non-finite objective"):
        run_search(config, 0, prior, tmp_path, lambda w, d: {"objective": float("nan")})


def test_a_sample_is_never_empty_nor_drawn_by_non_finite_weights():
    from forgetless.errors import ForgetlessError
    from forgetless.mix.corpus import Corpus
    from forgetless.mix.stages import sample_training_set
    from forgetless.model_config import ModelConfig

    corpus = Corpus(["a", "b"], ["some text " * 20, "other text " * 20], ["s", "s"])
    groups = np.array([0, 1])
    tiny = ModelConfig(name="tiny-llama")
    with pytest.raises(ForgetlessError, match="draws no document"):
        sample_training_set(corpus, groups, np.array([0.5, 0.5]), 1, tiny, repetition_cap=4, seed=0)
    with pytest.raises(ForgetlessError, match="weights must be finite"):
        sample_training_set(
            corpus, groups, np.array([np.nan, 1.0]), 500, tiny, repetition_cap=4, seed=0
        )


def test_mix_search_command_says_which_candidate_it_verified_and_kept(
    tmp_path, shared_data_dir, run_cli
):
    settings = {
        "mix.sources": '["c4", "pubmedqa@train"]',
        "mix.limit_per_source": 12,
        "mix.cluster.clusters": 4,
        "mix.cluster.merge_distance": 0.6,
        "mix.search.candidates": 100,
        "mix.search.predictor_iterations": 10,
        "mix.search.proxy_tokens": 1024,
        "mix.search.proxy_max_length": 32,
        "mix.search.target_limit": 4,
        "mix.search.noise_runs": 0,
        "mix.search.verify_runs": 2,
    }
    argv = ["mix", "search", "--output-dir", str(tmp_path), "--rounds", "4,2"]
    argv += ["--data-dir", str(shared_data_dir)]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    mixture = json.loads((tmp_path / "search" / "mixture.json").read_text())
    chosen = mixture["chosen"].replace("_", " ")
    assert f"verified {chosen}: objective" in err and "over 2 proxy seeds" in err
    assert "(chosen)" in err
