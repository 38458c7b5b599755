"""scripts/domain_merge_results.py end to end on the tiny model: experts, merges, paired table."""

import json

import pytest

from forgetless.evaluate import seeded

SCRIPT_NAME = "domain_merge_results"


TINY = {
    "model.name": "tiny-llama",
    "train.max_steps": 2,
    "train.max_length": 32,
    "evaluate.limit": 4,
    "evaluate.task_limits": "{}",
}


def tiny_argv(experiment_argv, *extra):
    return experiment_argv("table", TINY, "--domains", "medical", "legal", *extra)


def test_experts_merges_and_the_paired_table(tmp_path, experiment_argv, script, capsys):
    argv = tiny_argv(experiment_argv, "--merges", "task_arithmetic:scale=0.5", "sotu:0.5")
    script.main(argv)
    summary = json.loads((tmp_path / "out" / "table.json").read_text())
    models = [row["model"] for row in summary["rows"]]
    merged = ["task_arithmetic_scale=0.5", "sotu_0.5"]
    assert models == ["base", "expert medical", "expert legal", *merged]
    rows = {row["model"]: row for row in summary["rows"]}
    task = "ppl:pubmedqa@test"
    base, expert, merged = (
        rows[name]["scores"][task]["value"] for name in models[:2] + ["sotu_0.5"]
    )
    assert rows["sotu_0.5"]["gain_kept"]["medical"] == pytest.approx(
        (base - merged) / (base - expert)
    )
    # The general criterion compares losses against the base; a gain counts as no loss.
    for general, ok in rows["sotu_0.5"]["general_no_worse_than_best_expert"].items():

        def loss(name, general=general):
            score = rows[name]["scores"][general]
            delta = score["value"] - rows["base"]["scores"][general]["value"]
            return max(0.0, delta if score["metric"] == "perplexity" else -delta)

        assert ok == (loss("sotu_0.5") <= min(loss("expert medical"), loss("expert legal")))
    change = rows["expert medical"]["changes"][task]
    assert change["change"] == pytest.approx(100 * (expert / base - 1))
    assert change["ci95"][0] <= change["change"] <= change["ci95"][1]
    # Unmasked deltas overlap almost everywhere (rows of tokens never seen stay untouched).
    assert rows["task_arithmetic_scale=0.5"]["merge"]["collision_rate"] > 0.95
    merge_report = tmp_path / "run" / "task_arithmetic_scale=0.5" / "merge" / "model"
    merge_report = merge_report / "merge_report.json"
    assert json.loads(merge_report.read_text())["scale"] == 0.5
    # Two independent keep-0.5 masks: of the positions either keeps, both keep 0.25 / 0.75.
    assert rows["sotu_0.5"]["merge"]["collision_rate"] == pytest.approx(1 / 3, abs=0.02)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| sotu_0.5 |" in table and "gain kept" in table

    # The experts trained once: each is an arm of its own and a part of every merge.
    assert summary["frontier"].endswith("frontier.html")
    # Another merge reuses the base evaluation, the experts and their evaluations: a dry run
    # counts the three stages of its own arm as left to run.
    capsys.readouterr()
    script.main(tiny_argv(experiment_argv, "--merges", "dare:0.5", "--dry-run"))
    assert capsys.readouterr().out.strip().endswith(", 3 to run")
    script.main(tiny_argv(experiment_argv, "--merges", "dare:0.5"))
    started = [line for line in capsys.readouterr().out.splitlines() if "start:" in line]
    assert [line.rsplit("/", 1)[-1].split()[-1] for line in started] == [
        "merge",
        "eval_adapted",
        "report",
    ]


def test_a_malformed_merge_is_a_one_line_error(experiment_argv, script, user_error):
    with user_error("expected method"):
        script.main(tiny_argv(experiment_argv, "--merges", "sotu:lots"))


def test_merge_specs_set_masks_weights_and_normalize(script):
    fair = script.parse_merge("dare:0.33:normalize=true:masks=disjoint")
    assert fair.label == "dare_0.33_normalize=true_masks=disjoint"
    assert fair.overrides == {
        "merge.method": "dare",
        "merge.keep": 0.33,
        "merge.normalize": True,
        "merge.masks": "disjoint",
    }
    weighted = script.parse_merge("ties:0.2:weights=[1,2,0.5]")
    assert weighted.overrides["merge.weights"] == [1, 2, 0.5]


def test_merges_that_do_not_fit_the_experts_fail_before_training(
    tmp_path, experiment_argv, script, user_error
):
    # Two domains, two experts: disjoint masks of keep 0.6 would need 1.2 of the entries.
    with user_error("2 experts × merge.keep 0.6 = 1.2"):
        script.main(tiny_argv(experiment_argv, "--merges", "sotu:0.6:masks=disjoint"))
    with user_error("merge.weights has 3 values for 2 experts"):
        script.main(tiny_argv(experiment_argv, "--merges", "ties:0.2:weights=[1,2,1]"))
    assert not (tmp_path / "run").exists()  # nothing trained, nothing cached


def test_merges_pooled_over_mask_seeds_and_their_contrasts(
    tmp_path, experiment_argv, script, user_error
):
    merges = ["dare:0.5", "sotu:0.5", "sotu:0.5:seed=1", "sotu:0.5:seed=2"]
    with user_error("'ties:0.5' is not among --merges"):
        script.main(
            tiny_argv(experiment_argv, "--merges", *merges, "--contrast", "sotu:0.5", "ties:0.5")
        )
    script.main(
        tiny_argv(experiment_argv, "--merges", *merges, "--contrast", "sotu:0.5", "dare:0.5")
    )
    summary = json.loads((tmp_path / "out" / "table.json").read_text())
    pooled = summary["pooled_over_seeds"]
    assert pooled["contrasts"] == [["sotu:0.5", "dare:0.5"]]
    rows = {row["model"]: row for row in summary["rows"]}
    for task, result in pooled["tasks"].items():
        sotu, dare = result["arms"]["sotu:0.5"], result["arms"]["dare:0.5"]
        seeds = ["sotu_0.5", "sotu_0.5_seed=1", "sotu_0.5_seed=2"]
        # Each seed's pooled value is that merge's own paired change against the base.
        shown = [seeded.shown(value, result["unit"]) for value in sotu["per_seed"]]
        assert shown == pytest.approx([rows[label]["changes"][task]["change"] for label in seeds])
        assert len(dare["per_seed"]) == 1
        assert sotu["mean"] == pytest.approx(sum(sotu["per_seed"]) / 3)
        contrast = result["contrasts"]["sotu:0.5-dare:0.5"]
        assert contrast["difference"] == pytest.approx(sotu["mean"] - dare["mean"])
        assert contrast["ci95"][0] <= contrast["difference"] <= contrast["ci95"][1]
    # Other mask seeds draw other masks.
    assert len({rows[label]["merge"]["collision_rate"] for label in seeds}) > 1
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Merges pooled over mask seeds" in table
    assert "| sotu:0.5 | 3 |" in table and "| sotu:0.5 − dare:0.5 |" in table


def test_a_contrast_of_single_seed_merges_resamples_the_items(tmp_path, experiment_argv, script):
    merges = ["dare:0.5", "sotu:0.5"]
    script.main(tiny_argv(experiment_argv, "--merges", *merges, "--contrast", *merges[::-1]))
    summary = json.loads((tmp_path / "out" / "table.json").read_text())
    rows = {row["model"]: row for row in summary["rows"]}
    for task, result in summary["pooled_over_seeds"]["tasks"].items():
        sotu, dare = result["arms"]["sotu:0.5"], result["arms"]["dare:0.5"]
        assert len(sotu["per_seed"]) == len(dare["per_seed"]) == 1
        assert seeded.shown(sotu["mean"], result["unit"]) == pytest.approx(
            rows["sotu_0.5"]["changes"][task]["change"]
        )
        contrast = result["contrasts"]["sotu:0.5-dare:0.5"]
        assert contrast["difference"] == pytest.approx(sotu["mean"] - dare["mean"])
        assert contrast["ci95"][0] <= contrast["difference"] <= contrast["ci95"][1]
    assert "| sotu:0.5 − dare:0.5 |" in (tmp_path / "out" / "table.md").read_text()


def test_default_contrasts_are_those_whose_merges_are_compared(script):
    merges = [script.parse_merge(text) for text in ("sotu:0.33:seed=1", "ties:0.2", "dare:0.5")]
    assert script.chosen_contrasts(None, merges) == [("sotu:0.33", "ties:0.2")]


def test_the_validation_sweep_merges_the_table_s_own_experts(script):
    """configs/domain_merge_validation.yaml inherits the expert settings of domain_merge.yaml:
    unless its experts are the same stages (same fingerprints), the TIES scale it chooses is
    chosen for other models."""
    from forgetless.config import load_raw
    from forgetless.recipes.adapt import adapt_plan
    from forgetless.recipes.compare import expand_arms

    def expert_fingerprints(name: str) -> dict[str, str]:
        path = script.PACKAGED_CONFIG.with_name(name)
        merge_arm = expand_arms(load_raw(path), path)[-1]
        stages = adapt_plan(merge_arm.config, progress=False).stages
        return {s.name: s.fingerprint({}) for s in stages if s.name.startswith("train_")}

    table = expert_fingerprints("domain_merge.yaml")
    assert sorted(table) == ["train_financial", "train_legal", "train_medical"]
    assert expert_fingerprints("domain_merge_validation.yaml") == table
