"""The selection experiment at fair budgets (scripts/select_budgets.py) end to end on the tiny
model: token budgets trained once, seeds pooled, contrasts against random, and a rerun that
changes nothing."""

import json

from forgetless.config import load_raw, validate_config

SCRIPT_NAME = "select_budgets"


def test_the_packaged_config_is_valid(script):
    config = validate_config(load_raw(script.PACKAGED_CONFIG), script.PACKAGED_CONFIG)
    assert config.recipe.steps == ["select", "train"] and config.data.kind == "text"
    assert config.select.validation.split == "validation"


def test_select_budgets_on_the_tiny_model(tmp_path, experiment_argv, script, capsys):
    argv = experiment_argv("budgets", {}, "--quick")
    script.main(argv)
    output = tmp_path / "out" / "budgets.json"
    summary = json.loads(output.read_text())["domains"]["financial"]
    changes = summary["budgets"]["0.25"]
    task = summary["domain_task"]
    assert task == "ppl:financial_pool@test"
    assert list(changes[task]["arms"]) == ["full", "random", "less", "ogs"]
    assert len(changes[task]["arms"]["ogs"]["per_seed"]) == 2  # 1 selection x 2 training seeds
    assert set(changes[task]["contrasts"]) == {"less-random", "ogs-random", "ogs-less"}
    compute = summary["compute"]
    # Every selection trains the same tokens, at most once; the full pool one epoch.
    selected = [entry for name, entry in compute.items() if not name.startswith("full")]
    assert len({entry["tokens"] for entry in selected}) == 1
    assert all(0 < entry["epochs"] <= 1.0 for entry in compute.values())
    assert compute["full seed=0"]["epochs"] > 0.9
    # Which of the pool's sources each selection drew from: the full pool holds them all.
    full_sources = compute["full seed=0"]["sources"]
    assert sum(full_sources.values()) > 0
    for entry in selected:
        assert set(entry["sources"]) <= set(full_sources)
    table = (tmp_path / "out" / "budgets.md").read_text()
    assert "### Budget 25% of the tokens" in table and "| ogs |" in table
    capsys.readouterr()
    script.main([*argv, "--dry-run"])
    dry = capsys.readouterr().out.splitlines()
    assert len(dry) == 1 and dry[0].startswith("financial: ") and dry[0].endswith(" finished")
    script.main(argv)
    assert "start:" not in capsys.readouterr().out
    assert json.loads(output.read_text())["domains"]["financial"] == summary


def test_random_is_required(script, user_error):
    with user_error("must include random"):
        script.parse_args(["--quick", "--methods", "less", "ogs"])
