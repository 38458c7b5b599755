"""The criterion test of the selection cost (scripts/ogs_criterion.py): arms matched on utility
and tokens, intervals over items and seeds, the regression, and the script end to end on the
tiny model."""

import json
import shutil

import numpy as np
import pytest

from forgetless.config import load_raw, validate_config
from forgetless.errors import ForgetlessError
from forgetless.evaluate.seeded import (
    TaskItems,
    format_change,
    perplexity_percent,
    seeded_changes,
)
from forgetless.select.criterion import (
    ARMS,
    fit_line,
    matched_arms,
    random_subsets,
    utility_strata,
)

SCRIPT_NAME = "ogs_criterion"


def _hard_pool(count=3000, seed=0):
    """Utility, a criterion that goes with utility, and lengths that go with the criterion:
    what makes naive deciles differ in utility and tokens."""
    rng = np.random.default_rng(seed)
    utility = rng.normal(size=count)
    criterion = 0.7 * utility + rng.normal(size=count)
    tokens = np.maximum(8, rng.lognormal(5 + 0.3 * criterion, 0.6)).astype(np.int64)
    return utility, criterion, tokens


def test_arms_are_matched_on_utility_and_tokens():
    utility, criterion, tokens = _hard_pool()
    strata = utility_strata(utility, 20)
    arms = matched_arms(criterion, strata, tokens, 0.1, np.random.default_rng(0))
    weighted = {name: np.average(utility[arm], weights=tokens[arm]) for name, arm in arms.items()}
    spread = max(weighted.values()) - min(weighted.values())
    assert spread / utility.std() < 0.1
    # Every arm holds a tenth of each stratum's tokens, passing it by less than one record.
    for arm in arms.values():
        for label in range(20):
            share = 0.1 * tokens[strata == label].sum()
            held = tokens[arm[strata[arm] == label]]
            assert share <= held.sum() < share + held.max()
    # The criterion separates the arms, and the low and high arms share no sample.
    assert criterion[arms["low"]].mean() < criterion[arms["random"]].mean()
    assert criterion[arms["random"]].mean() < criterion[arms["high"]].mean()
    assert not np.intersect1d(arms["low"], arms["high"]).size
    # Naive deciles of the criterion would differ by far more in utility.
    order = np.argsort(criterion)
    assert abs(utility[order[:300]].mean() - utility[order[-300:]].mean()) > 1.0
    again = matched_arms(criterion, strata, tokens, 0.1, np.random.default_rng(0))
    assert all(np.array_equal(arms[name], again[name]) for name in arms)


def test_random_subsets_hold_the_token_share():
    _, _, tokens = _hard_pool(500)
    budget = 0.1 * tokens.sum()
    for subset in random_subsets(tokens, budget, 5, np.random.default_rng(1)):
        assert budget <= tokens[subset].sum() < budget + tokens.max()


def test_arms_refuse_overlapping_or_impossible_shares():
    utility, criterion, tokens = _hard_pool(100)
    with pytest.raises(ForgetlessError, match="fraction"):
        matched_arms(criterion, utility_strata(utility, 4), tokens, 0.6, np.random.default_rng(0))
    with pytest.raises(ForgetlessError, match="fewer strata"):
        matched_arms(criterion, utility_strata(utility, 50), tokens, 0.5, np.random.default_rng(0))


def test_fit_line_recovers_a_slope_and_declines_without_one():
    x = np.linspace(0.0, 1.0, 12)
    y = 2.0 * x + np.random.default_rng(0).normal(scale=0.05, size=12)
    fit = fit_line(x, y)
    assert fit["slope_ci95"][0] < 2.0 < fit["slope_ci95"][1]
    assert fit["spearman"] > 0.9 and fit["spearman_ci95"][0] > 0.5
    assert fit_line(x, np.ones(12))["slope"] is None
    assert fit_line(x[:2], y[:2])["slope"] is None


def _evaluation(nll, correct):
    metrics = {"ppl": {"metric": "perplexity"}, "mc": {"metric": "accuracy"}}
    items = {
        "ppl": {"document_nll": nll, "document_tokens": [10, 10, 10, 10]},
        "mc": {"correct": correct},
    }
    return metrics, items


def test_seeded_changes_average_seeds_and_pair_items():
    base = _evaluation([20.0, 20.0, 20.0, 20.0], [1, 0, 1, 0])
    models = {
        "a-s0": _evaluation([21.0, 21.0, 21.0, 21.0], [1, 1, 1, 0]),
        "a-s1": _evaluation([23.0, 23.0, 23.0, 23.0], [1, 1, 1, 1]),
        "b-s0": _evaluation([20.0, 20.0, 20.0, 20.0], [1, 0, 1, 0]),
        "b-s1": _evaluation([20.0, 20.0, 20.0, 20.0], [0, 0, 1, 0]),
    }
    arms = {"a": ["a-s0", "a-s1"], "b": ["b-s0", "b-s1"]}
    loss = seeded_changes(TaskItems.read("ppl", base, models), arms, [("a", "b")])
    assert loss["unit"] == "nats/token"
    assert loss["arms"]["a"]["per_seed"] == pytest.approx([0.1, 0.3])
    assert loss["arms"]["a"]["mean"] == pytest.approx(0.2)
    assert loss["contrasts"]["a-b"]["difference"] == pytest.approx(0.2)
    # Every document moved alike: only the seeds make the interval.
    low, high = loss["contrasts"]["a-b"]["ci95"]
    assert 0.1 - 1e-9 <= low <= 0.2 <= high <= 0.3 + 1e-9
    accuracy = seeded_changes(TaskItems.read("mc", base, models), arms, [("a", "b")])
    assert accuracy["arms"]["a"]["per_seed"] == pytest.approx([25.0, 50.0])
    assert accuracy["arms"]["b"]["mean"] == pytest.approx(-12.5)
    assert perplexity_percent(0.0) == 0.0


def test_changes_are_shown_in_percent_perplexity_or_points():
    arm = {"per_seed": [0.1, 0.3], "mean": 0.2, "ci95": [0.1, 0.3]}
    # exp(0.1), exp(0.2), exp(0.3) - 1 in %; the sd is that of the shown per-seed values.
    assert format_change(arm, "nats/token") == "+22.1 [+10.5, +35.0]"
    assert format_change(arm, "nats/token", spread=True) == "+22.1 ± 17.3 [+10.5, +35.0]"
    contrast = {"difference": -2.5, "ci95": [-4.0, -1.0]}
    assert format_change(contrast, "points", spread=True) == "-2.5 [-4.0, -1.0]"


def test_the_packaged_config_is_valid(script):
    config = validate_config(load_raw(script.PACKAGED_CONFIG), script.PACKAGED_CONFIG)
    assert script.anchor_task(config) == "ppl:gsm8k@test"
    assert config.data.kind == "text" and config.recipe.steps == ["train"]
    evaluate = config.evaluate
    assert set(evaluate.task_limits) == {*evaluate.domain_tasks, *evaluate.general_tasks}


def test_criterion_experiment_on_the_tiny_model(tmp_path, experiment_argv, script, capsys):
    argv = experiment_argv("criterion", {}, "--quick")
    # A dry run before anything ran: the gradient stages to run; nothing is written.
    script.main([*argv, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gradients: ") and lines[0].endswith(" to run")
    assert lines[1] == "arms: planned once criterion_arms is in the run directory"
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    script.main(argv)
    output = tmp_path / "out" / "criterion.json"
    summary = json.loads(output.read_text())
    subsets = summary["subsets"]
    assert list(subsets)[:3] == ["low", "high", "random"]
    assert [name for name in subsets if name.startswith("subset")] == [
        "subset00",
        "subset01",
        "subset02",
    ]
    # Matched on tokens: every model trains the same tokens, within one pass of its subset.
    training = [model["training"] for model in summary["models"].values()]
    assert len(training) == 3 * 2 + 3
    trained = training[0]["input_tokens_seen"]
    assert all(run["input_tokens_seen"] == trained for run in training)
    assert all(0 < run["epochs"] <= 1.0 for run in training)
    assert summary["matching"]["tokens_min"] >= trained
    # Matched on utility, as far as 80 records in 4 strata allow.
    assert summary["matching"]["utility_smd_max"] < 0.5
    low, high = (subsets[name]["predicted"]["mean_cost"] for name in ("low", "high"))
    assert low < subsets["random"]["predicted"]["mean_cost"] < high
    # The anchor's held-out loss, with seeds and contrasts.
    anchor = summary["changes"]["ppl:gsm8k@test"]
    assert anchor["unit"] == "nats/token"
    assert len(anchor["arms"]["low"]["per_seed"]) == 2
    assert set(anchor["contrasts"]) == {"low-high", "low-random", "high-random"}
    for task in ("c4", "arc_easy", "piqa", "boolq"):
        assert set(summary["changes"][task]["arms"]) == {"low", "high", "random"}
    # The regression of the subsets' anchor-loss change on their predicted cost.
    fit = summary["regression"]["ppl:gsm8k@test"]["mean_cost"]
    assert fit["points"] == 3
    assert fit["slope_ci95"][0] <= fit["slope"] <= fit["slope_ci95"][1]
    assert summary["primary_predictor"] == "mean_cost"
    sources = summary["pool"]["sources"]
    assert sum(row["records"] for row in sources.values()) == summary["pool"]["usable"]
    # The change's spread between subsets beside one arm's spread between seeds.
    spread = summary["anchor_change_spread"]
    assert spread["between_subsets_sd"] > 0
    assert set(spread["between_seeds_sd"]) == {"low", "high", "random"}
    # Descriptive: the same fit over every trained model, the arms at each seed included.
    assert summary["regression_all_models"]["ppl:gsm8k@test"]["mean_cost"]["points"] == 9
    assert set(summary["verdict"]) == {
        "low_forgets_less_than_high",
        "slope_above_zero",
        "cost_predicts_forgetting",
    }
    table = (tmp_path / "out" / "criterion.md").read_text()
    assert "| low − high |" in table and "## Regression over 3 random subsets" in table
    assert "| mean_cost |" in table and "## Verdict" in table
    assert "Spread of the anchor-loss change" in table
    # A dry run of the finished experiment: every stage finished, nothing written.
    capsys.readouterr()
    files = {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")}
    script.main([*argv, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["gradients", "arms"]
    assert all(line.split(": ")[1].split(" ", 1)[1] == "finished" for line in lines), lines
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "run").rglob("*")} == files
    # A rerun reuses every stage and writes the same results.
    script.main(argv)
    assert "start:" not in capsys.readouterr().out
    assert json.loads(output.read_text()) == summary
    # An interim report on the first seed reuses the same trainings: the step budget does
    # not depend on which arms run.
    script.main([*argv, "--seeds", "0"])
    assert "start:" not in capsys.readouterr().out
    interim = json.loads(output.read_text())
    assert interim["models"]["low-s0"] == summary["models"]["low-s0"]
    assert len(interim["changes"]["ppl:gsm8k@test"]["arms"]["low"]["per_seed"]) == 1
    # --exact adds the exact costs' stages and nothing else: the trainings are reused.
    script.main([*argv, "--exact", "--dry-run"])
    assert capsys.readouterr().out.splitlines()[1] == "exact: 2 to run"
    script.main([*argv, "--exact"])
    started = [line for line in capsys.readouterr().out.splitlines() if "start:" in line]
    assert [line.split("start: ")[1] for line in started] == ["exact_directions", "exact_pool"]
    exact = json.loads(output.read_text())
    assert exact["models"] == summary["models"]
    assert exact["sketch_vs_exact"]["records"] == summary["pool"]["usable"]
    assert -1 <= exact["sketch_vs_exact"]["cost"]["spearman"] <= 1
    assert all("exact_mean_cost" in subset["predicted"] for subset in exact["subsets"].values())
    assert exact["regression"]["ppl:gsm8k@test"]["exact_mean_cost"]["points"] == 3
    # The verdict's regression is on the exact mean cost, the same quantity without noise.
    assert exact["primary_predictor"] == "exact_mean_cost"
    assert "Sketched against exact" in (tmp_path / "out" / "criterion.md").read_text()


def test_a_new_machine_resumes_from_the_archive_without_gradients(
    tmp_path, experiment_argv, script, capsys
):
    # An archive too small for the gradients (and models) keeps their records only, as the
    # real run's 0.7 GB of features; the arms' stage, evaluations and reports it keeps whole.
    archive = {"archive_dir": tmp_path / "archive", "archive_max_mb": 0.05}
    argv = experiment_argv("criterion", archive, "--quick", "--seeds", "0")
    script.main([*argv, "--subsets", "4"])
    first = json.loads((tmp_path / "out" / "criterion.json").read_text())
    kept_whole = {
        json.loads((folder / "stage.json").read_text())["stage"]
        for folder in (tmp_path / "archive").iterdir()
        if not (folder / "RECORD_ONLY").exists()
    }
    assert "criterion_arms" in kept_whole and "gradients_pool" not in kept_whole
    shutil.rmtree(tmp_path / "run")
    capsys.readouterr()
    script.main([*argv, "--dry-run"])
    assert capsys.readouterr().out.splitlines()[1] == (
        "arms: planned once criterion_arms is in the run directory"
    )
    # The same subsets, from the archived arms alone: no gradient, no training, the same
    # arms; fewer subsets (an interim report) are the first of the same draws.
    script.main([*argv, "--subsets", "3"])
    assert "start:" not in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "criterion.json").read_text())
    del first["subsets"]["subset03"]
    assert again["subsets"] == first["subsets"] and again["changes"] == first["changes"]


def test_a_trajectory_retrains_the_arms_and_scores_them_on_the_way(
    tmp_path, experiment_argv, script, capsys, user_error
):
    argv = experiment_argv("criterion", {}, "--quick")
    script.main(argv)
    steps = json.loads((tmp_path / "out" / "criterion.json").read_text())["models"]["low-s0"][
        "training"
    ]["steps"]
    with user_error("trajectory steps [0, 999] must lie within train.max_steps"):
        script.main([*argv, "--trajectory", "0", "999"])
    with user_error("--trajectory: give step 0"):
        script.main([*argv, "--trajectory", "1", "2"])
    capsys.readouterr()
    script.main([*argv, "--trajectory", "0", "1", str(steps)])
    started = [
        line.split("start: ")[1]
        for line in capsys.readouterr().out.splitlines()
        if "start:" in line
    ]
    assert started == [f"trajectory-{arm}-s{seed}" for seed in (0, 1) for arm in ARMS]
    summary = json.loads((tmp_path / "out" / "criterion.json").read_text())
    trajectory = summary["trajectory"]
    assert trajectory["steps"] == [0, 1, steps]
    # The perplexity tasks among the general ones, by step after the first.
    assert set(trajectory["changes"]) == {"ppl:gsm8k@test", "c4"}
    by_step = trajectory["changes"]["c4"]
    assert list(by_step) == ["1", str(steps)]
    assert set(by_step["1"]["contrasts"]) == {"low-high", "low-random", "high-random"}
    assert len(by_step["1"]["arms"]["low"]["per_seed"]) == 2
    assert by_step["1"]["arms"]["low"]["mean"] != 0.0
    # Scoring on the way leaves the updates as they were: the last step is the arm's model.
    for per_task in trajectory["last_step_minus_evaluation"].values():
        assert all(abs(value) < 1e-9 for value in per_task.values())
    assert (
        "## Held-out losses during training (seeds 0, 1)"
        in (tmp_path / "out" / "criterion.md").read_text()
    )
    script.main([*argv, "--trajectory", "0", "1", str(steps)])
    assert "start:" not in capsys.readouterr().out


def test_retest_measures_the_costs_agreement_across_projection_seeds(
    tmp_path, experiment_argv, script
):
    script.main(experiment_argv("retest", {}, "--quick", "--retest", "16", "64"))
    summary = json.loads((tmp_path / "out" / "retest.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert [row["projection_dim"] for row in summary["rows"]] == [16, 64]
    for row in summary["rows"]:
        assert row["records"] > 10
        for name in ("cost", "utility"):
            rho, (low, high) = row[name]["spearman"], row[name]["ci95"]
            # Two projections of the same gradients: related, not identical.
            assert 0 < rho < 1 and -1 <= low <= high <= 1
    # Each dimension and seed featurised in a run directory of its own; nothing trained.
    run = tmp_path / "run"
    assert sorted(path.name for path in run.iterdir()) == ["d16", "d64"]
    assert sorted(path.name for path in (run / "d16").iterdir()) == ["seed0", "seed1"]
    assert not list(run.glob("**/train"))
    assert "| 16 |" in (tmp_path / "out" / "retest.md").read_text()


def test_the_sketch_approaches_the_exact_cost_as_d_grows(tmp_path, experiment_argv, script):
    script.main(experiment_argv("retest", {}, "--quick", "--retest", "16", "4096", "--exact"))
    summary = json.loads((tmp_path / "out" / "retest.json").read_text())
    small, large = (row["first_seed_vs_exact"] for row in summary["rows"])
    assert small["records"] == large["records"] > 10
    # The tiny model's 4096-dimensional sketch is nearly its exact gradient.
    assert large["cost"]["spearman"] > 0.9 and large["utility"]["spearman"] > 0.9
    assert small["cost"]["spearman"] < large["cost"]["spearman"]
    # The exact stages ran once, in a run directory of their own, for every D.
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["d16", "d4096", "exact"]
    assert "sketch vs exact" in (tmp_path / "out" / "retest.md").read_text()


def test_exact_costs_need_the_conflict_cost_and_the_models_weights(
    tmp_path, experiment_argv, script, user_error
):
    with user_error("exact costs exist for select.cost=conflict"):
        script.main(experiment_argv("bad", {"select.cost": "energy"}, "--quick", "--exact"))
    with user_error("keep a projector other than exact and add --exact"):
        script.main(experiment_argv("bad", {"select.gradient.projector": "exact"}, "--quick"))
    with user_error("set select.gradient.parameters to blocks or last_blocks"):
        script.main(
            experiment_argv(
                "bad",
                {"select.gradient.parameters": "lora", "select.gradient.projector": "rademacher"},
                "--quick",
                "--exact",
            )
        )
    assert not (tmp_path / "run").exists()


def test_retest_flags_are_checked(tmp_path, experiment_argv, script, user_error):
    with user_error("--retest: projection dimensions must be positive"):
        script.main(experiment_argv("bad", {}, "--quick", "--retest", "0"))
    with user_error("leave out --dry-run"):
        script.main(experiment_argv("bad", {}, "--quick", "--retest", "16", "--dry-run"))
    with user_error("--retest trains nothing: leave out --trajectory"):
        script.main(
            experiment_argv("bad", {}, "--quick", "--retest", "16", "--trajectory", "0", "2")
        )
    assert not (tmp_path / "run").exists()
