"""scripts/continual_results.py on the tiny model: the sweep, the table and its head note."""

import json

SCRIPT_NAME = "continual_results"

TINY = {
    "model.name": "tiny-llama",
    "model.device": "cpu",
    "train.max_steps": 1,
    "train.batch_size": 4,
    "train.max_length": 1024,
    "continual.train_limit": 4,
    "continual.eval_limit": 4,
    "continual.retention_tasks": "[]",
    "merge.keep": 0.25,
}


def test_closed_form_sweep_writes_the_table_of_both_methods(tmp_path, experiment_argv, script):
    settings = {**TINY, "continual.head": "closed_form"}
    flags = ("--methods", "seqft", "sotu", "--subsets", "0_42")
    script.main(experiment_argv("table", settings, *flags))
    reports = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [(r["method"], r["subset"], r["head"]) for r in reports] == [
        ("seqft", "0_42", "closed_form"),
        ("sotu", "0_42", "closed_form"),
    ]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Head: closed-form, class-incremental" in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    for report in reports:
        metrics, row = report["metrics"], rows[report["method"]]
        assert f"| {100 * metrics['average_accuracy']:.1f} |" in row
        assert metrics["fwt"] is None and "| n/a |" in row
    assert table.count("| base (LM head) |") == 2
