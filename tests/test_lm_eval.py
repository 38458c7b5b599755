"""lm-evaluation-harness both ways: exported task configs and lm-eval runs on forgetless models."""

import json
import math
import os
import sys

import pytest

from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.lm_eval import export_tasks, final_model, hub_offline, run_lm_eval
from forgetless.evaluate.tasks import load_tasks

ARC_ITEMS = 8


@pytest.fixture
def needs_lm_eval():
    pytest.importorskip(
        "lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[dev]'"
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data_dir):
    """A finished `forgetless run` of tiny-llama: two training steps, then both evaluations."""
    from forgetless.config import ForgetlessConfig
    from forgetless.recipes.adapt import run_adapt

    run_dir = tmp_path_factory.mktemp("run")
    config = ForgetlessConfig.model_validate(
        {
            "model": {"name": "tiny-llama", "device": "cpu"},
            "data": {"source": "pubmedqa", "kind": "text", "split": "train", "limit": 8},
            "train": {"max_steps": 2, "batch_size": 2, "max_length": 32},
            "evaluate": {
                "domain_tasks": ["ppl:pubmedqa"],
                "general_tasks": ["arc_easy", "c4"],
                "limit": 1,
                "task_limits": {"arc_easy": ARC_ITEMS},
            },
            "run_dir": str(run_dir),
            "data_dir": str(shared_data_dir),
        }
    )
    run_adapt(config, progress=False)
    return run_dir, config


def test_exported_arc_easy_matches_the_run_item_by_item(
    needs_lm_eval, trained_run, shared_data_dir, tmp_path
):
    from forgetless.evaluate import score_multiple_choice
    from forgetless.models import load_model

    run_dir, config = trained_run
    evaluate = config.evaluate
    export_tasks(["arc_easy", "c4"], evaluate, tmp_path, data_dir=shared_data_dir)

    output = run_lm_eval(
        run_dir, ["forgetless_arc_easy", "forgetless_c4"], include_path=tmp_path, log_samples=True
    )

    assert output["resolved_model"] == str(run_dir / "train" / "model")
    assert output["n_samples"]["forgetless_arc_easy"] == ARC_ITEMS
    theirs = output["samples"]["forgetless_arc_easy"]
    loaded = load_model(output["resolved_model"], device="cpu")
    _, records = load_tasks(["arc_easy"], evaluate, data_dir=shared_data_dir)["arc_easy"]
    ours = score_multiple_choice(loaded.model, loaded.tokenizer, records, progress=False)
    assert [row["acc"] for row in theirs] == [float(item.correct) for item in ours.items]
    assert [row["acc_norm"] for row in theirs] == [float(item.correct_norm) for item in ours.items]
    # The run's own reported number, reproduced by lm-eval.
    metrics = json.loads((run_dir / "eval_adapted" / "metrics.json").read_text())
    assert output["results"]["forgetless_arc_easy"]["acc"] == pytest.approx(
        metrics["arc_easy"]["value"]
    )
    # Perplexity tasks run too, in lm-eval's own units (not comparable with ours).
    c4 = output["results"]["forgetless_c4"]
    assert all(math.isfinite(c4[name]) for name in ("word_perplexity", "bits_per_byte"))


def test_export_is_deterministic_and_holds_the_scored_items(shared_data_dir, tmp_path):
    evaluate = EvalConfig(task_limits={"arc_easy": 3, "c4": 2})
    tasks = ["arc_easy", "c4"]
    files = export_tasks(tasks, evaluate, tmp_path, data_dir=shared_data_dir)
    first = {path: path.read_bytes() for path in files}
    again = export_tasks(tasks, evaluate, tmp_path, data_dir=shared_data_dir)

    assert again == files
    assert {path: path.read_bytes() for path in again} == first
    assert [path.name for path in files] == [
        "forgetless_arc_easy.jsonl",
        "forgetless_arc_easy.yaml",
        "forgetless_c4.jsonl",
        "forgetless_c4.yaml",
        "forgetless_retention.yaml",
    ]
    _, records = load_tasks(["arc_easy"], evaluate, data_dir=shared_data_dir)["arc_easy"]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(row["query"], tuple(row["choices"]), row["gold"]) for row in rows] == [
        (record.query, record.choices, record.gold) for record in records
    ]


def test_generation_task_is_refused_before_writing(shared_data_dir, tmp_path):
    with pytest.raises(ForgetlessError, match="gsm8k.*generation"):
        export_tasks(["arc_easy", "gsm8k"], EvalConfig(limit=2), tmp_path, shared_data_dir)
    assert not list(tmp_path.iterdir())


def test_unknown_lm_eval_task_is_one_line(needs_lm_eval, tmp_path):
    with pytest.raises(ForgetlessError, match="forgetless_no_such_task") as raised:
        run_lm_eval("tiny-llama", ["forgetless_no_such_task"], include_path=tmp_path)
    assert "\n" not in str(raised.value)


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ForgetlessError, match=r"forgetless\[lmeval\]"):
        run_lm_eval("tiny-llama", ["arc_easy"])


def _stage(run_dir, folder, fingerprint, inputs=None, model=False):
    """A finished stage as RunDirectory records it; ``model``: it hands on ``model/``."""
    directory = run_dir / folder
    directory.mkdir(parents=True)
    summary = {"model_dir": "model"} if model else {}
    record = {"fingerprint": fingerprint, "inputs": inputs or {}, "summary": summary}
    (directory / "stage.json").write_text(json.dumps(record))
    if model:
        (directory / "model").mkdir()
        (directory / "model" / "config.json").write_text("{}")


def test_final_model_of_a_merge_run_is_the_merged_one(tmp_path):
    for name in ("train_med", "train_law"):
        _stage(tmp_path, name, name, model=True)
    _stage(tmp_path, "merge", "m", {"train_med": "train_med", "train_law": "train_law"}, True)
    _stage(tmp_path, "eval_base", "b")
    _stage(tmp_path, "eval_adapted", "a", {"merge": "m"})
    _stage(tmp_path, "report", "r", {"eval_base": "b", "eval_adapted": "a", "merge": "m"})

    assert final_model(tmp_path) == tmp_path / "merge" / "model"


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (["train.partial-0123456789abcdef"], "unfinished"),
        (["arm_a/report", "arm_b/report"], "several runs.*arm_a, .*arm_b"),
        ([], "neither a model checkpoint .*nor a forgetless run"),
    ],
)
def test_final_model_refuses_what_is_no_finished_run(tmp_path, layout, message):
    for folder in layout:
        if folder.endswith("/report"):
            _stage(tmp_path, folder, folder)
        else:
            (tmp_path / folder).mkdir()
    with pytest.raises(ForgetlessError, match=message):
        final_model(tmp_path)


def test_hub_offline_switches_already_imported_libraries_and_restores_them(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ


def test_cli_exports_then_runs_on_the_run_directory(
    needs_lm_eval, trained_run, shared_data_dir, tmp_path, run_cli
):
    run_dir, _ = trained_run
    tasks_dir = tmp_path / "tasks"
    argv = ["lm-eval", "export", "--tasks", "arc_easy", "--output-dir", str(tasks_dir)]
    argv += ["--set", f"evaluate.task_limits={{arc_easy: {ARC_ITEMS}}}", "--json"]
    code, out, err = run_cli([*argv, "--data-dir", str(shared_data_dir)])
    assert code == 0, err
    assert json.loads(out) == [
        str(tasks_dir / "forgetless_arc_easy.jsonl"),
        str(tasks_dir / "forgetless_arc_easy.yaml"),
        str(tasks_dir / "forgetless_retention.yaml"),
    ]
    argv = ["lm-eval", "run", "--model", str(run_dir), "--tasks", "forgetless_arc_easy"]
    code, out, err = run_cli([*argv, "--include-path", str(tasks_dir), "--json"])
    assert code == 0, err
    result = json.loads(out)  # lm-eval's own logging stayed on stderr
    metrics = json.loads((run_dir / "eval_adapted" / "metrics.json").read_text())
    assert result["results"]["forgetless_arc_easy"]["acc"] == pytest.approx(
        metrics["arc_easy"]["value"]
    )
    code, out, _ = run_cli([*argv, "--include-path", str(tasks_dir)])
    assert code == 0 and "forgetless_arc_easy" in out and "acc_norm" in out
