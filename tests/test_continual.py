"""The continual-learning harness: metrics on hand-computed matrices, a tiny run end to end."""

import json
from pathlib import Path

import pytest
import torch

from forgetless.config import load_config
from forgetless.data import get_dataset_spec
from forgetless.errors import ForgetlessError
from forgetless.recipes.continual import (
    ORDERS,
    plan_continual,
    run_continual,
    sample_records,
    task_sequence,
)
from forgetless.report.continual import (
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
    forward_transfer,
)

# Rows: after training on task 0, 1, 2; columns: tasks 0, 1, 2.
MATRIX = [
    [0.8, 0.3, 0.2],
    [0.6, 0.9, 0.4],
    [0.5, 0.7, 0.9],
]
BASE = [0.1, 0.2, 0.3]


def test_metrics_of_a_hand_computed_matrix():
    assert average_accuracy(MATRIX) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # Last row minus the diagonal, over the first T - 1 tasks.
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    # The entry above the diagonal minus the base model, over tasks 1..T-1.
    assert forward_transfer(MATRIX, BASE) == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)
    # Best of the first T - 1 rows minus the last row, over the first T - 1 tasks.
    assert forgetting(MATRIX) == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)


def test_forgetting_counts_a_peak_reached_before_the_task_was_trained():
    # Task 1 peaks at 0.6 after task 0 (before its own stage), ends at 0.4 (Chaudhry et al.).
    matrix = [[0.5, 0.6, 0.0], [0.5, 0.5, 0.0], [0.5, 0.4, 0.7]]
    assert forgetting(matrix) == pytest.approx((0.0 + 0.2) / 2)
    assert backward_transfer(matrix) == pytest.approx((0.0 - 0.1) / 2)


def test_single_row_has_only_average_accuracy():
    metrics = continual_metrics([[0.4, 0.6]], [0.1, 0.2])
    assert metrics == {
        "average_accuracy": pytest.approx(0.5),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
    }
    assert continual_metrics([[0.4]], [0.1])["bwt"] is None  # one task: nothing to transfer


def test_malformed_matrices_are_rejected():
    with pytest.raises(ValueError, match="T x T"):
        backward_transfer([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="base row"):
        forward_transfer(MATRIX, [0.1])


def test_orders_name_registered_data_sets():
    for benchmark, orders in ORDERS.items():
        for order in orders:
            tasks = task_sequence(benchmark, order)
            assert len(set(tasks)) == len(tasks) == (4 if benchmark == "fewshot" else 10)
            for task in tasks:
                get_dataset_spec(task)
    assert task_sequence("fewshot", 1) == [
        "fewshot_dbpedia",
        "fewshot_amazon",
        "fewshot_yahoo",
        "fewshot_agnews",
    ]
    with pytest.raises(ForgetlessError, match="choose one of: 4, 5, 6"):
        task_sequence("olora", 1)


def test_limits_sample_across_the_file_not_its_head():
    records = list(range(100))
    chosen = sample_records(records, 10, seed=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == 10
    assert max(chosen) >= 50  # the files are sorted by label: a prefix would hold one class
    assert chosen == sample_records(records, 10, seed=0)
    assert sample_records(records, None, seed=0) == records


# A tiny run: byte-level tokens, so max_length must hold a whole prompt (~600 bytes).
TINY = {
    "model.name": "tiny-llama",
    "model.device": "cpu",
    "train.max_steps": 2,
    "train.batch_size": 4,
    "train.max_length": 1024,
    "continual.train_limit": 8,
    "continual.eval_limit": 6,
    "continual.retention_tasks": [],
}


def _events():
    seen: list[tuple[str, str]] = []

    def record(event, info):
        seen.append((event, info if isinstance(info, str) else info.name))

    return seen, record


def test_seqft_run_builds_the_matrix_and_reuses_finished_stages(tmp_path, shared_data_dir):
    config = load_config(None, {**TINY, "run_dir": str(tmp_path)})
    planned = plan_continual(config)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    assert [p.folder for p in planned[:3]] == [
        "fewshot-0_42/eval_base", "fewshot-0_42/order1-seqft/train_01_dbpedia",
        "fewshot-0_42/order1-seqft/eval_01_dbpedia",
    ]  # fmt: skip
    assert {p.state for p in planned} == {"to run"} and planned[-1].stage == "report"
    results = run_continual(config)
    # What the dry run listed is what ran, in the same folders.
    assert [(p.folder, p.fingerprint) for p in planned] == [
        (str(results[p.stage].directory.relative_to(tmp_path)), results[p.stage].fingerprint)
        for p in planned
    ]
    assert {p.state for p in plan_continual(config)} == {"finished"}
    report_dir = results["report"].directory
    report = json.loads((report_dir / "continual.json").read_text())
    assert report["tasks"] == task_sequence("fewshot", 1)
    assert len(report["matrix"]) == 4 and all(len(row) == 4 for row in report["matrix"])
    assert len(report["base"]) == 4
    assert set(report["metrics"]) == {"average_accuracy", "bwt", "fwt", "forgetting"}
    assert all(value is not None for value in report["metrics"].values())
    assert report["evaluation"]["items"] == dict.fromkeys(report["tasks"], 6)
    assert [entry["steps"] for entry in report["training"]] == [2, 2, 2, 2]
    assert [entry["records"] for entry in report["training"]] == [8, 8, 8, 8]
    assert (report_dir / "continual.png").is_file()
    markdown = (report_dir / "continual.md").read_text()
    assert "| after \\ on | dbpedia | amazon | yahoo | agnews |" in markdown
    assert "| 4. agnews |" in markdown
    sequence = tmp_path / "fewshot-0_42" / "order1-seqft"
    assert (sequence / "train_01_dbpedia" / "model" / "model.safetensors").is_file()
    # Each task starts from the previous task's model.
    second = json.loads((sequence / "train_02_amazon" / "stage.json").read_text())
    assert second["inputs"] == {"train_01_dbpedia": results["train_01_dbpedia"].fingerprint}
    assert not (sequence / "train_01_dbpedia" / "checkpoints").exists()
    tasks = sequence / "eval_04_agnews" / "tasks"
    assert len(list(tasks.glob("*.items.json"))) == 4  # the final stage's per-item outcomes
    assert len(list(tasks.glob("*.json"))) == 8
    assert not list(tmp_path.rglob("*.partial-*"))

    seen, record = _events()
    again = run_continual(load_config(None, {**TINY, "run_dir": str(tmp_path)}), on_event=record)
    assert {event for event, _ in seen} == {"cached"}  # nothing retrained or re-evaluated
    assert json.loads((again["report"].directory / "continual.json").read_text()) == report

    # Another method reuses the base evaluation and trains from the base model again.
    seen, record = _events()
    lora = {**TINY, "run_dir": str(tmp_path), "continual.method": "lora", "train.max_steps": 1}
    run_continual(load_config(None, lora), on_event=record)
    assert ("cached", "eval_base") in seen and ("start", "train_01_dbpedia") in seen
    lora_report = tmp_path / "fewshot-0_42" / "order1-lora" / "report" / "continual.json"
    training = json.loads(lora_report.read_text())["training"]
    assert [entry["method"] for entry in training] == ["lora"] * 4
    assert (tmp_path / "fewshot-0_42" / "order1-lora" / "train_04_agnews" / "adapter").is_dir()


def test_osft_preserves_more_of_each_matrix_task_after_task(tmp_path, shared_data_dir):
    overrides = {**TINY, "run_dir": str(tmp_path), "continual.method": "osft"}
    overrides.update({"train.max_steps": 1, "train.osft.calibration_samples": 2})
    overrides.update({"continual.train_limit": 4, "continual.eval_limit": 2})
    results = run_continual(load_config(None, overrides))
    ranks = []
    for name in ("train_01_dbpedia", "train_02_amazon", "train_03_yahoo", "train_04_agnews"):
        assert results[name].summary["method"] == "osft"
        chosen = json.loads((results[name].directory / "osft_ranks.json").read_text())
        ranks.append(sum(choice["rank"] for choice in chosen))
    # osft.for_task grows the preserved ratio from trr to final_trr along the sequence.
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_sotu_trains_experts_from_the_base_and_merges_them(tmp_path, shared_data_dir):
    overrides = {**TINY, "run_dir": str(tmp_path), "continual.method": "sotu"}
    overrides.update({"train.max_steps": 1, "continual.train_limit": 4})
    overrides.update({"continual.eval_limit": 2, "merge.keep": 0.25})
    results = run_continual(load_config(None, overrides))
    sequence = tmp_path / "fewshot-0_42" / "order1-sotu"
    # Every expert starts from the base model, not from the previous task's model.
    for name in ("train_01_dbpedia", "train_04_agnews"):
        assert json.loads((sequence / name / "stage.json").read_text())["inputs"] == {}
    last = results["merge_04_agnews"]
    assert last.summary["experts"] == [
        "train_01_dbpedia",
        "train_02_amazon",
        "train_03_yahoo",
        "train_04_agnews",
    ]
    merge_report = json.loads((last.directory / "model" / "merge_report.json").read_text())
    assert merge_report["method"] == "sotu" and merge_report["keep"] == 0.25
    assert json.loads((sequence / "eval_04_agnews" / "stage.json").read_text())["inputs"] == {
        "merge_04_agnews": last.fingerprint
    }
    report = json.loads((results["report"].directory / "continual.json").read_text())
    assert len(report["matrix"]) == 4 and report["method"] == "sotu"


def test_closed_form_head_accumulates_classes_task_after_task(tmp_path, shared_data_dir, run_cli):
    argv = ["continual", "--method", "sotu", "--head", "closed_form", "--output-dir", str(tmp_path)]
    for key, value in {**TINY, "train.max_steps": 1, "continual.eval_limit": 4}.items():
        if key != "run_dir":
            argv += ["--set", f"{key}={value}"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert "Class-incremental" in out
    sequence = tmp_path / "fewshot-0_42" / "order1-sotu"
    report = json.loads((sequence / "report_closed_form" / "continual.json").read_text())
    matrix = report["matrix"]
    # Tasks whose classes the head has not seen yet score 0; FWT is not reported.
    assert all(matrix[i][j] == 0.0 for i in range(4) for j in range(i + 1, 4))
    assert report["metrics"]["fwt"] is None and report["head"] == "closed_form"
    # The final outcomes are kept for paired comparisons, and agree with the matrix.
    finals = [sum(report["final_items"][task]) / 4 for task in report["tasks"]]
    assert finals == pytest.approx(matrix[-1])
    state = torch.load(sequence / "cil_04_agnews" / "closed_form_head.pt", weights_only=True)
    # 14 DBpedia + 5 Amazon + 10 Yahoo + 4 AG News classes, in sequence order.
    assert state["cross"].shape[1] <= 33 and len(state["seen"]) > 4
    assert state["seen"] == sorted(state["seen"])
    # The head of stage 2 continues from stage 1's statistics.
    stage = json.loads((sequence / "cil_02_amazon" / "stage.json").read_text())
    assert set(stage["inputs"]) == {"merge_02_amazon", "cil_01_dbpedia"}


def test_closed_form_head_recomputed_on_the_current_backbone(tmp_path, shared_data_dir, run_cli):
    argv = ["continual", "--method", "seqft", "--head", "closed_form"]
    argv += ["--output-dir", str(tmp_path)]
    settings = {**TINY, "train.max_steps": 1, "continual.eval_limit": 4}
    settings["continual.head_statistics"] = "recompute"
    for key, value in settings.items():
        if key != "run_dir":
            argv += ["--set", f"{key}={value}"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    sequence = tmp_path / "fewshot-0_42" / "order1-seqft"
    # No head is carried over: stage 2 refits on tasks 1 and 2 through its own model only.
    stage = json.loads((sequence / "cil_02_amazon" / "stage.json").read_text())
    assert set(stage["inputs"]) == {"train_02_amazon"}
    assert stage["settings"]["fit_tasks"] == ["fewshot_dbpedia", "fewshot_amazon"]
    first = torch.load(sequence / "cil_01_dbpedia" / "closed_form_head.pt", weights_only=True)
    second = torch.load(sequence / "cil_02_amazon" / "closed_form_head.pt", weights_only=True)
    # Both heads hold DBpedia's classes, fitted through different backbones.
    assert set(first["seen"]) < set(second["seen"])
    dbpedia = sorted(first["seen"])
    assert not torch.allclose(first["cross"][:, dbpedia], second["cross"][:, dbpedia])


def test_help_names_the_options(run_cli):
    code, out, _ = run_cli(["continual", "--help"])
    assert code == 0
    for option in ("--benchmark", "--order", "--method", "--subset", "--eval-limit"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--benchmark", "fewshot", "--order", "4"], "choose one of: 1, 2, 3"),
        (["--benchmark", "olora", "--order", "2"], "choose one of: 4, 5, 6"),
        (["--method", "gem"], "continual.method"),
        (["--subset", "9_999"], "9_999"),
    ],
)
def test_cli_mistakes_give_one_line(argv, needle, tmp_path, shared_data_dir, run_cli):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["continual", *argv, "--output-dir", str(run_dir)])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not run_dir.exists()


def test_cli_multitask_run_is_one_row_without_transfer_metrics(tmp_path, shared_data_dir, run_cli):
    overrides = {**TINY, "train.max_steps": 1, "evaluate.limit": 4}
    overrides["continual.retention_tasks"] = ["arc_easy"]
    argv = ["continual", "--order", "3", "--method", "multitask", "--output-dir", str(tmp_path)]
    argv += ["--train-limit", "4", "--eval-limit", "3"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert "# Continual learning: fewshot order 3, multitask" in out
    assert "| after \\ on | yahoo | amazon | agnews | dbpedia |" in out
    assert "| multitask (all tasks) |" in out and "| backward transfer (BWT) | n/a |" in out
    assert "▶ train_all" in err and "report files:" in err
    report_file = tmp_path / "fewshot-0_42" / "order3-multitask" / "report" / "continual.json"
    report = json.loads(report_file.read_text())
    assert len(report["matrix"]) == 1 and len(report["matrix"][0]) == 4
    assert report["metrics"]["average_accuracy"] is not None
    assert [report["metrics"][key] for key in ("bwt", "fwt", "forgetting")] == [None] * 3
    assert report["evaluation"]["items"] == dict.fromkeys(report["tasks"], 3)
    # One run on the shuffled union, with as many steps as the four-task sequence gets.
    assert report["training"][0]["records"] == 16 and report["training"][0]["steps"] == 4
    assert [row["task"] for row in report["retention"]] == ["arc_easy"]


def test_every_order_shares_one_multitask_training_and_evaluation(tmp_path, shared_data_dir):
    def planned(order):
        overrides = {**TINY, "run_dir": str(tmp_path), "continual.method": "multitask"}
        stages = plan_continual(load_config(None, {**overrides, "continual.order": order}))
        return {p.stage: p.fingerprint for p in stages}

    first, third = planned(1), planned(3)
    assert first["train_all"] == third["train_all"] and first["eval_all"] == third["eval_all"]
    assert first["report"] != third["report"]  # its matrix follows each order


def test_paired_average_accuracy_adds_the_tasks_variances():
    from forgetless.report.continual import paired_average_accuracy, pooled_paired_difference

    a = {"t1": [1, 1, 0, 1], "t2": [1, 0, 0, 0, 1, 1]}
    b = {"t1": [0, 1, 0, 0], "t2": [1, 1, 0, 0, 0, 1]}
    difference, variance = paired_average_accuracy(a, b)
    # t1: differences 1,0,0,1 (mean .5, var 1/3); t2: 0,-1,0,0,1,0 (mean 0, var .4)
    assert difference == pytest.approx((0.5 + 0.0) / 2)
    assert variance == pytest.approx((1 / 3 / 4 + 0.4 / 6) / 4)
    with pytest.raises(ValueError, match="different tasks"):
        paired_average_accuracy(a, {"t1": b["t1"]})
    # Two runs on independent item samples (two seed splits): their variances add.
    mean, low, high = pooled_paired_difference([[(a, b)], [(b, a)]])
    assert mean == pytest.approx(0.0)
    assert high - mean == pytest.approx(1.959963984540054 * (2 * variance) ** 0.5 / 2)
    # The same run twice on the same items (two orders of one split, identical outcomes)
    # says nothing more than once: the interval keeps its width.
    once = pooled_paired_difference([[(a, b)]])
    twice = pooled_paired_difference([[(a, b), (a, b)]])
    assert twice == pytest.approx(once)
    assert once[2] - once[0] == pytest.approx(1.959963984540054 * variance**0.5)


def test_the_benchmark_lora_rank_matches_osft_trainable_directions():
    from transformers import AutoModelForCausalLM

    from forgetless.config import load_config
    from forgetless.model_shapes import shape_config
    from forgetless.train.osft import matched_lora_rank, target_modules

    packaged = Path(__file__).resolve().parents[1] / "src/forgetless/configs"
    config = load_config(packaged / "continual_benchmark.yaml")
    with torch.device("meta"):  # SmolLM2-135M's shapes, no weights
        model = AutoModelForCausalLM.from_config(shape_config("random:smollm2-135m"))
    shapes = [
        tuple(module.weight.shape)
        for module in target_modules(model, config.train.osft.target_modules).values()
    ]
    assert config.model.name == "smollm2-135m" and len(shapes) == 7 * 30
    assert config.train.lora.r == matched_lora_rank(shapes, config.train.osft, tasks=4)
    assert config.train.lora.alpha == 2 * config.train.lora.r  # the default alpha / r


def test_runs_scored_on_the_validation_split_keep_folders_of_their_own(tmp_path, shared_data_dir):
    """Stage folders are named, so a validation run (a learning-rate choice) sharing the run
    directory with the test run would replace its evaluations, and the other way round."""
    test = load_config(None, {**TINY, "run_dir": str(tmp_path)})
    valid = load_config(None, {**TINY, "run_dir": str(tmp_path), "continual.eval_split": "valid"})
    test_folders = {p.folder for p in plan_continual(test)}
    valid_folders = {p.folder for p in plan_continual(valid)}
    assert "fewshot-0_42-valid/eval_base" in valid_folders
    assert "fewshot-0_42/eval_base" in test_folders
    assert not test_folders & valid_folders
