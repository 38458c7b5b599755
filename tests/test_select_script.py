"""scripts/select_results.py end to end on the tiny model: selections, equal-step training,
the paired gain-vs-retention table."""

import json

SCRIPT_NAME = "select_results"


def test_selection_experiment_table(tmp_path, experiment_argv, script, capsys):
    settings = {
        "model.name": "tiny-llama",
        "data.limit": 40,
        "train.max_steps": 2,
        "train.max_length": 32,
        "evaluate.limit": 4,
        "evaluate.task_limits": "{}",
        "evaluate.general_tasks": "[c4, arc_easy]",
        "select.budget": 0.25,
        "select.anchor.samples": 8,
        "select.validation.samples": 6,
        "select.featured_samples": 20,
        "select.gradient.projection_dim": 16,
        "select.gradient.warmup_steps": 1,
        "select.gradient.max_length": 400,
        "select.navigator.iterations": 5,
        "select.navigator.candidates": 8,
    }
    argv = experiment_argv("select", settings, "--domains", "medical")
    script.main(argv)
    summary = json.loads((tmp_path / "out" / "select.json").read_text())
    rows = summary["domains"]["medical"]["rows"]
    assert list(rows) == ["full", "random", "less", "orthogonal", "ogs"]
    for label, row in rows.items():
        assert set(row["changes"]) == {
            "ppl:pubmedqa@test",
            "ppl:financial_phrasebank",
            "c4",
            "arc_easy",
        }
        # Every model trains for the same number of steps, whatever its data size.
        assert row["training"]["steps"] == 2
        if label != "full":
            assert row["selected"] == round(0.25 * 34)
    # The same steps are more passes over a selection than over the whole pool.
    assert rows["random"]["training"]["epochs"] > rows["full"]["training"]["epochs"] > 0
    # The full baseline trains on exactly the candidates the methods choose from.
    candidates = tmp_path / "run" / "medical" / "selection_all" / "selected.jsonl"
    assert len(candidates.read_text().splitlines()) == 34
    # The methods share the gradients of the pool (computed once, in the shared folder).
    assert (tmp_path / "run" / "medical" / "gradients_anchor" / "stage.json").is_file()
    assert (tmp_path / "out" / "select.md").is_file()
    frontier = tmp_path / "run" / "medical" / "frontier" / "frontier.html"
    assert summary["domains"]["medical"]["frontier"] == str(frontier) and frontier.is_file()
    target = summary["domains"]["medical"]["ogs_target"]
    assert set(target) >= {"gain_share_ok", "drop_share_ok", "not_dominated_by_random_or_less"}
    table = (tmp_path / "out" / "select.md").read_text()
    assert "| ogs |" in table and "cross-validated" in table
    # Rerunning reuses every stage, as a dry run says beforehand.
    capsys.readouterr()
    script.main([*argv, "--dry-run"])
    assert capsys.readouterr().out.splitlines() == ["medical: 28 finished"]
    script.main(argv)
    assert "start:" not in capsys.readouterr().out
