"""scripts/mix_results.py end to end on tiny models: search, three mixtures, paired table."""

import json

SCRIPT_NAME = "mix_results"


def test_mixture_experiment_table(tmp_path, experiment_argv, script):
    settings = {
        "model.name": "tiny-llama",
        "train.max_steps": 2,
        "train.max_length": 32,
        "evaluate.limit": 4,
        "evaluate.task_limits": "{}",
        "mix.limit_per_source": 12,
        "mix.cluster.clusters": 6,
        "mix.cluster.merge_distance": 0.6,
        "mix.cluster.super_clusters": "null",
        "mix.search.rounds": "[4, 2]",
        "mix.search.candidates": 200,
        "mix.search.predictor_iterations": 20,
        "mix.search.proxy_tokens": 2048,
        "mix.search.proxy_max_length": 32,
        "mix.search.target_limit": 4,
        "mix.search.noise_runs": 2,
    }
    script.main(experiment_argv("mix", settings, "--tokens", "4096"))
    summary = json.loads((tmp_path / "out" / "mix.json").read_text())
    assert set(summary["changes"]) == {"climb", "uniform", "natural"}
    count = summary["clusters"]["super_clusters"]
    for weights in summary["weights"].values():
        assert len(weights) == count and abs(sum(weights) - 1) < 1e-6
    assert [entry["round"] for entry in summary["search"]["rounds"]] == [1, 2]
    for name in ("climb", "uniform", "natural"):
        assert set(summary["changes"][name]) == {"ppl:pubmedqa@test", "ppl:boolq", "arc_easy"}
        assert summary["training"][name]["steps"] == 2
    table = (tmp_path / "out" / "mix.md").read_text()
    assert "| climb |" in table
    # Six proxy runs are too few for 5-fold cross-validation: shown as missing, not made up.
    assert "Spearman cross-validated |" in table and "| 2 | 2 |" in table
    assert summary["search"]["rounds"][1]["spearman_cross_validated"] is None
    # The natural mixture under two proxy seeds: its spread is reported beside the rounds'.
    assert summary["search"]["noise_std"] > 0
    assert "Proxy seed noise (natural mixture" in table
