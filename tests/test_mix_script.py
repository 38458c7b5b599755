"""scripts/mix_results.py end to end on tiny models: a retention-constrained search, the
mixtures and the domain-only arm under two training seeds, the pooled table and verdicts."""

import json
from pathlib import Path

import pytest

SCRIPT_NAME = "mix_results"
CONFIGS = Path(__file__).resolve().parents[1] / "src/forgetless/configs"
TINY = {
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


def test_retention_aware_mixtures_against_natural_uniform_and_domain_only(
    tmp_path, experiment_argv, script
):
    config = CONFIGS / "mix_retention.yaml"
    argv = experiment_argv("mix", TINY, "--tokens", "4096", "--config", str(config))
    script.main([*argv, "--train-seeds", "0", "1"])
    summary = json.loads((tmp_path / "out" / "mix.json").read_text())
    arms = ["climb", "natural", "uniform", "domain only"]
    assert summary["arms"] == {name: [f"{name} seed=0", f"{name} seed=1"] for name in arms}
    assert summary["train_seeds"] == [0, 1]
    assert summary["constraints"] == {"ppl:web_pool@validation": 0.0}
    # The domain-only arm trains on the medical text itself: no mixture, the same steps.
    assert list(summary["weights"]) == ["climb", "natural", "uniform"]
    count = summary["clusters"]["super_clusters"]
    for weights in summary["weights"].values():
        assert len(weights) == count and abs(sum(weights) - 1) < 1e-6
    for label in summary["changes"]:
        assert summary["training"][label]["steps"] == 2
    pooled = summary["pooled"]
    assert pooled["contrasts"] == [["climb", other] for other in arms[1:]]
    for task, result in pooled["tasks"].items():
        climb = result["arms"]["climb"]
        assert len(climb["per_seed"]) == 2
        assert climb["mean"] == pytest.approx(sum(climb["per_seed"]) / 2)
        for other in arms[1:]:
            contrast = result["contrasts"][f"climb-{other}"]
            assert contrast["difference"] == pytest.approx(
                climb["mean"] - result["arms"][other]["mean"]
            )
            # The verdict follows the interval of the difference.
            verdict = summary["verdicts"][other]["tasks"][task]
            low, high = contrast["ci95"]
            assert verdict == "within noise" or (low > 0 or high < 0)
    for verdict in summary["verdicts"].values():
        values = set(verdict["tasks"].values())
        assert verdict["pareto_better"] == ("worse" not in values and "better" in values)
    table = (tmp_path / "out" / "mix.md").read_text()
    assert "| domain only |" in table and "Pareto-better" in table
    assert "constraints (largest relative perplexity increase" in table
    # Six proxy runs are too few for 5-fold cross-validation: shown as missing, not made up.
    assert "Spearman cross-validated |" in table and "| 2 | 2 |" in table
    assert summary["search"]["rounds"][1]["spearman_cross_validated"] is None
    # The natural mixture under two proxy seeds: its spread is reported beside the rounds'.
    assert summary["search"]["noise_std"] > 0
    assert "Proxy seed noise (natural mixture" in table
    # Both final candidates were measured under fresh proxy seeds, and the trained one is said.
    verification = summary["verification"]
    assert set(verification["candidates"]) <= {"predicted", "best_observed"}
    assert all(row["runs"] == 3 for row in verification["candidates"].values())
    assert (
        summary["weights"]["climb"] == verification["candidates"][verification["chosen"]]["weights"]
    )
    assert "Verification (mix.search.verify_runs" in table


def test_perplexity_changes_are_broken_down_by_source(script, shared_data_dir):
    import math

    from forgetless.config import load_config

    task = "ppl:medical_pool@test"
    config = load_config(
        None, {"evaluate.task_limits": {task: 4}, "data_dir": str(shared_data_dir)}
    )
    # The pool's first four test documents: three abstracts, then a MedQuAD answer.
    tokens = [10, 20, 30, 40]
    base = (
        {task: {"metric": "perplexity"}},
        {task: {"document_nll": [10.0, 20.0, 30.0, 40.0], "document_tokens": tokens}},
    )

    def evaluation(shift_abstracts, shift_medquad):
        nll = [10.0 + shift_abstracts, 20.0, 30.0, 40.0 + shift_medquad]
        return ({}, {task: {"document_nll": nll, "document_tokens": tokens}})

    evaluations = {"a0": evaluation(6.0, -4.0), "a1": evaluation(-6.0, -8.0)}
    rows = script.changes_by_source(config, [task], base, evaluations, {"a": ["a0", "a1"]})[task]
    assert rows["documents"] == {"medical_abstracts": 3, "medquad": 1}
    # Mean over the seeds of each seed's change on the source's tokens.
    expected_abstracts = (math.expm1(6 / 60) + math.expm1(-6 / 60)) / 2
    expected_medquad = (math.expm1(-4 / 40) + math.expm1(-8 / 40)) / 2
    assert rows["arms"]["a"]["medical_abstracts"] == pytest.approx(100 * expected_abstracts)
    assert rows["arms"]["a"]["medquad"] == pytest.approx(100 * expected_medquad)


def test_without_seeds_the_published_arms_stay_as_they_are():
    from forgetless.config import load_raw
    from forgetless.recipes.compare import expand_arms

    arms = expand_arms(load_raw(CONFIGS / "mix_experiment.yaml", {}))
    # Each arm trains once under the config's seed, in the published run's folders.
    assert [(arm.label, arm.folder, arm.seed) for arm in arms] == [
        (name, name, None) for name in ("climb", "uniform", "natural")
    ]


def test_the_searched_arm_is_required(tmp_path, experiment_argv, script, user_error):
    argv = experiment_argv(
        "mix", {**TINY, "compare.arms": '{"natural": {"mix": {"method": "natural"}}}'}
    )
    with user_error("compare.arms must include 'climb'"):
        script.main(argv)
    assert not (tmp_path / "run").exists()


def test_another_config_plans_without_run_dir_or_output_flags(
    tmp_path, monkeypatch, shared_data_dir, script, capsys
):
    monkeypatch.chdir(tmp_path)
    config = CONFIGS / "mix_retention.yaml"
    script.main(["--config", str(config), "--data-dir", str(shared_data_dir), "--dry-run"])
    assert capsys.readouterr().out.startswith("mix: ")
    # A dry run writes nothing, not even the default runs/mix_retention.
    assert list(tmp_path.iterdir()) == []
