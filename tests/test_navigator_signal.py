"""The Navigator-signal measurement (scripts/navigator_signal.py) end to end on the tiny model:
both seeds' exact scores, the reliability ceiling, the cross-validated Navigator per input
set, the scores from the last blocks' gradients, and a rerun that changes nothing."""

import json

import pytest

from forgetless.config import load_raw, validate_config

SCRIPT_NAME = "navigator_signal"


def test_the_packaged_config_features_every_record(script):
    config = validate_config(load_raw(script.PACKAGED_CONFIG), script.PACKAGED_CONFIG)
    assert config.select.method == "ogs"
    assert config.select.featured_samples >= config.data.limit
    assert config.select.validation.source is not None  # same candidates under every seed


def test_navigator_signal_on_the_tiny_model(tmp_path, experiment_argv, script, capsys):
    argv = experiment_argv("signal", {}, "--quick")
    script.main(argv)
    output = tmp_path / "out" / "signal.json"
    summary = json.loads(output.read_text())
    assert summary["samples"] == 40 and summary["seeds"] == [0, 1]
    assert set(summary["reliability"]) == {
        "utility", "alignment", "energy", "conflict", "abs_cosine", "norm_conflict", "lagrangian",
    }  # fmt: skip
    assert set(summary["exact_choice"]) == {"0", "1"}
    noise = summary["projection_noise"]
    assert noise["columns"] == 8 and set(noise["same_warmup"]) == {"0", "1"}
    for rho in [*noise["same_warmup"].values(), noise["across_seeds"]]:
        assert set(rho) == {"utility", "energy", "lagrangian"}
        assert all(value is None or -1 <= value <= 1 for value in rho.values())
    # The learning curve: the same held-out folds, fewer training samples per point.
    for label, points in summary["learning_curve"].items():
        counts = [point["training_samples"] for point in points]
        assert [point["share"] for point in points] == [0.25, 0.5, 0.75]
        assert (
            counts == sorted(counts)
            and counts[-1] < summary["navigator"][label]["training_samples"]
        )
    for name, value in summary["reliability"].items():
        low, high = summary["ranges"][name]
        assert low <= high
        # A score constant over the records has no rank correlation.
        assert (value is None) if low == high else -1 <= value <= 1
    # Different seeds give different gradients: the score does not agree with itself exactly.
    assert summary["reliability"]["lagrangian"] < 0.999
    navigator = summary["navigator"]
    assert [entry["columns"] for entry in navigator.values()] == [386, 3, 389]
    for entry in navigator.values():
        assert entry["folds"] == 5 and entry["samples"] == 40
        assert -1 <= entry["spearman_vs_exact"] <= 1
    assert set(summary["sketch_vs_exact"]) == {"head_utility", "head_energy", "head_alignment"}
    assert set(summary["lagrangian_vs_parts"]) == {"utility", "energy"}
    # The tiny model has two blocks: the last one is a part of the features, the last four
    # are all of them, so their scores are the exact ones.
    partial = summary["partial_gradients"]
    assert set(partial) == {"last 1", "last 4"}
    assert all(value == pytest.approx(1.0) for value in partial["last 4"]["spearman"].values())
    assert partial["last 1"]["spearman"]["lagrangian"] < 0.999
    table = (tmp_path / "out" / "signal.md").read_text()
    assert "## Reliability ceiling" in table and "| lagrangian |" in table
    assert "| last 1 |" in table
    assert "## Where the test-retest noise comes from" in table
    capsys.readouterr()
    script.main(argv)
    assert "start:" not in capsys.readouterr().out
    assert json.loads(output.read_text()) == summary


def test_the_two_seeds_must_differ(script, user_error):
    with user_error("two different seeds"):
        script.parse_args(["--quick", "--seeds", "3", "3"])


def test_exact_features_are_refused(tmp_path, experiment_argv, script, user_error):
    settings = {
        "select.gradient.projector": "exact",
        "select.gradient.parameters": "blocks",
        "select.cost": "conflict",
    }
    with user_error("select.gradient.projector=exact has neither"):
        script.main(experiment_argv("bad", settings, "--quick"))
    assert not (tmp_path / "run").exists()


def test_partial_blocks_must_be_positive(script, user_error):
    with user_error("--partial-blocks must be positive"):
        script.parse_args(["--quick", "--partial-blocks", "0"])


@pytest.mark.parametrize("share", ["0", "1", "1.5"])
def test_learning_curve_shares_lie_strictly_inside_zero_and_one(script, user_error, share):
    with user_error("--learning-curve shares must lie strictly between 0 and 1"):
        script.parse_args(["--quick", "--learning-curve", share])


def test_a_constant_score_has_no_rank_agreement(script):
    import numpy as np

    ranks = np.arange(5.0)
    assert script.rank_correlation(ranks, ranks[::-1]) == pytest.approx(-1.0)
    # A clipped cost that is zero on every record ranks nothing: undefined, not NaN.
    assert script.rank_correlation(ranks, np.zeros(5)) is None
    assert script.format_correlation(None) == "undefined (constant)"
    assert script.format_correlation(0.5) == "+0.50"
