"""scripts/continual_results.py on the tiny model: the sweep, the table and its head note."""

import json
import statistics
from pathlib import Path

import pytest

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


def paired_section(table_file: Path) -> tuple[str, dict[str, str]]:
    """The header line of a results table's paired differences and its rows by method."""
    table = table_file.read_text()
    section = table[table.index("## Paired differences") :].split("## Accuracy matrices")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return lines[0], {line.split(" | ")[0][2:]: line for line in lines[1:]}


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
    summary = table[: table.index("## Accuracy matrices")]
    summary, paired = summary.split("## Paired differences")
    sotu_row = next(line for line in paired.splitlines() if line.startswith("| sotu |"))
    assert sotu_row.endswith("(1) |")  # the closed-form head keeps its outcomes too
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line[:2] == "| "}
    for report in reports:
        metrics, row = report["metrics"], rows[report["method"]]
        assert f"| {100 * metrics['average_accuracy']:.1f} |" in row
        assert metrics["fwt"] is None and "| n/a |" in row
    assert table.count("| base (LM head) |") == 2
    # The same sweep with the statistics recomputed, paired with the first on the same items.
    settings["continual.head_statistics"] = "recompute"
    against = f"accumulate={tmp_path / 'out' / 'table.json'}"
    script.main(experiment_argv("recompute", settings, *flags, "--against", against))
    header, rows = paired_section(tmp_path / "out" / "recompute.md")
    assert header == "| method | vs seqft | vs accumulate (same method) |"
    assert rows["seqft"].endswith("(1) |")


def test_results_to_pair_with_are_checked(tmp_path, experiment_argv, script, user_error):
    with user_error("--against old: give NAME=RESULTS.json"):
        script.main(experiment_argv("bad", TINY, "--against", "old"))
    (tmp_path / "other.json").write_text('{"rows": []}')
    with user_error("is not a continual_results.py results file"):
        script.main(experiment_argv("bad", TINY, "--against", f"old={tmp_path / 'other.json'}"))
    assert not (tmp_path / "run").exists()


def test_runs_of_two_orders_get_a_section_each_and_paired_differences(
    tmp_path, experiment_argv, script
):
    flags = ("--methods", "seqft", "osft", "multitask", "--runs", "1:0_42", "2:0_42")
    flags += ("--method-set", "osft:train.learning_rate=0.002")
    script.main(experiment_argv("orders", TINY, *flags))
    reports = json.loads((tmp_path / "out" / "orders.json").read_text())
    assert [(r["method"], r["order"]) for r in reports] == [
        ("seqft", 1), ("osft", 1), ("multitask", 1), ("seqft", 2), ("osft", 2), ("multitask", 2)
    ]  # fmt: skip
    for report in reports:
        records = [Path(entry["directory"]) / "stage.json" for entry in report["training"]]
        rates = {json.loads(r.read_text())["settings"]["train"]["learning_rate"] for r in records}
        assert rates == {0.002 if report["method"] == "osft" else 1e-4}
        items = report["final_items"]
        assert set(items) == set(report["tasks"])
        # The final row of the matrix is the mean of the kept outcomes.
        finals = [sum(items[task]) / len(items[task]) for task in report["tasks"]]
        assert finals == pytest.approx(report["matrix"][-1])
    table = (tmp_path / "out" / "orders.md").read_text()
    assert "## Order 1:" in table and "## Order 2:" in table
    every_run = table[table.index("## All runs (2 runs over orders 1, 2)") :]
    osft_row = next(line for line in every_run.splitlines() if line.startswith("| osft |"))
    averages = [100 * r["metrics"]["average_accuracy"] for r in reports if r["method"] == "osft"]
    mean, std = statistics.mean(averages), statistics.stdev(averages)
    assert osft_row.startswith(f"| osft | 2 | {mean:.1f} ± {std:.1f} |")
    # Multitask trains once whatever the order: one model, one run.
    multitask_row = next(line for line in every_run.splitlines() if line[:13] == "| multitask |")
    assert multitask_row.startswith("| multitask | 1 |")
    _, rows = paired_section(tmp_path / "out" / "orders.md")
    assert rows["osft"].endswith("(2) |")  # pooled over both orders
    assert rows["seqft"].startswith("| seqft | – | ") and rows["seqft"].endswith("(2) |")


def test_runs_and_method_settings_are_checked(experiment_argv, script, user_error):
    with user_error("ORDER:SPLIT"):
        script.main(experiment_argv("bad", TINY, "--runs", "1"))
    with user_error("METHOD:section.key=value"):
        script.main(experiment_argv("bad", TINY, "--method-set", "train.learning_rate=1"))
    with user_error("--references lora: not among --methods"):
        script.main(experiment_argv("bad", TINY, "--methods", "seqft", "--references", "lora"))


def test_merge_variants_share_the_experts_and_get_rows_of_their_own(
    tmp_path, experiment_argv, script, capsys
):
    flags = ("--methods", "sotu", "sotu@disjoint", "--subsets", "0_42")
    flags += ("--method-set", "sotu@disjoint:merge.masks=disjoint")
    script.main(experiment_argv("variants", TINY, *flags))
    reports = json.loads((tmp_path / "out" / "variants.json").read_text())
    # A dry run of the finished sweep finds every stage, the shared experts included, done.
    capsys.readouterr()
    script.main(experiment_argv("variants", TINY, *flags, "--dry-run"))
    assert capsys.readouterr().out.splitlines() == [
        "sotu on order 1, split 0_42: 14 finished",
        "sotu@disjoint on order 1, split 0_42: 14 finished",
    ]
    assert [(r["method"], r["variant"]) for r in reports] == [("sotu", None), ("sotu", "disjoint")]
    plain, disjoint = ([entry["directory"] for entry in r["training"]] for r in reports)
    # The experts (train_*) are the same folders; each variant has merges of its own.
    assert [d for d in plain if "/train_" in d] == [d for d in disjoint if "/train_" in d]
    merges = [Path(d) for d in disjoint if "/merge_" in d]
    assert merges and all(d.name.endswith("@disjoint") for d in merges)
    merge_report = json.loads((merges[-1] / "model" / "merge_report.json").read_text())
    assert merge_report["masks"] == "disjoint"
    table = (tmp_path / "out" / "variants.md").read_text()
    assert "| sotu@disjoint |" in table and "**sotu@disjoint, order 1, split 0_42**" in table
    # Paired against the plain variant instead of seqft (which did not run): the table only.
    script.main(experiment_argv("variants", TINY, *flags, "--references", "sotu"))
    assert "start:" not in capsys.readouterr().out
    header, rows = paired_section(tmp_path / "out" / "variants.md")
    assert header == "| method | vs sotu |"
    assert rows["sotu@disjoint"].endswith("(1) |")


def test_methods_and_variants_are_checked(tmp_path, experiment_argv, script, user_error):
    with user_error("'sotuu' is not one of"):
        script.main(experiment_argv("bad", TINY, "--methods", "sotuu"))
    with user_error("continual.variant"):
        script.main(experiment_argv("bad", TINY, "--methods", "seqft@a/b", "--subsets", "0_42"))
    assert not (tmp_path / "run").exists()


def test_a_variant_of_a_training_method_trains_a_sequence_of_its_own(
    tmp_path, experiment_argv, script
):
    flags = ("--methods", "seqft", "seqft@fast", "--subsets", "0_42", "--references", "seqft")
    flags += ("--method-set", "seqft@fast:train.learning_rate=0.002")
    script.main(experiment_argv("own", TINY, *flags))
    reports = json.loads((tmp_path / "out" / "own.json").read_text())
    assert [(r["method"], r["variant"]) for r in reports] == [("seqft", None), ("seqft", "fast")]
    plain, fast = ([Path(entry["directory"]) for entry in r["training"]] for r in reports)
    assert {d.parent.name for d in plain} == {"order1-seqft"}
    assert {d.parent.name for d in fast} == {"order1-seqft@fast"}
    for report, rate in zip(reports, (1e-4, 0.002), strict=True):
        records = [Path(entry["directory"]) / "stage.json" for entry in report["training"]]
        assert {
            json.loads(r.read_text())["settings"]["train"]["learning_rate"] for r in records
        } == {rate}
    _, rows = paired_section(tmp_path / "out" / "own.md")
    assert rows["seqft@fast"].endswith("(1) |")
    # Without retention tasks, the header has as many cells as the rows.
    table = (tmp_path / "out" / "own.md").read_text().splitlines()
    header = table.index(
        "| method | runs | avg accuracy | BWT | FWT | forgetting"
        " | train tokens | train s | peak MB |"
    )
    assert table[header + 1] == "|---" * 9 + "|"
    fast_row = table[header + 3].split(" | ")
    assert fast_row[:2] == ["| seqft@fast", "1"] and len(fast_row) == 9
    # The tokens every training stage of the sequence saw.
    assert fast_row[6] == f"{sum(e['input_tokens_seen'] for e in reports[1]['training']):,}"


def test_the_configs_run_dir_holds_unless_the_flag_names_another(tmp_path, script):
    """The packaged benchmark config keeps its runs in its own run_dir, not in the few-shot
    sweep's; --run-dir still wins."""
    from argparse import Namespace

    config = Path(__file__).resolve().parents[1] / "src/forgetless/configs/continual_benchmark.yaml"
    args = Namespace(
        config=str(config), methods=["seqft"], runs=["1:0_42"], run_dir=None, set=None,
        method_set=None, data_dir=str(tmp_path),
    )  # fmt: skip
    [(_, configured)] = script.sweep_configs(args)
    assert configured.run_dir == "runs/continual_benchmark"
    args.run_dir = str(tmp_path / "elsewhere")
    [(_, chosen)] = script.sweep_configs(args)
    assert chosen.run_dir == str(tmp_path / "elsewhere")
