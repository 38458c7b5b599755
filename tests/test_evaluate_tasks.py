"""Task names -> data + metric, and evaluation of every metric kind on the tiny model."""

import math

import pytest

from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.tasks import evaluate_tasks, parse_task
from forgetless.models import load_model


@pytest.mark.parametrize(
    ("name", "kind", "source", "split"),
    [
        ("arc_easy", "multiple_choice", "arc_easy", "test"),
        ("pubmedqa", "multiple_choice", "pubmedqa", "test"),
        ("ppl:pubmedqa", "perplexity", "pubmedqa", "test"),
        ("ppl:pubmedqa@train", "perplexity", "pubmedqa", "train"),
        ("c4", "perplexity", "c4", "test"),
        ("gsm8k", "generation", "gsm8k", "test"),
        ("ppl:my/notes.jsonl", "perplexity", "my/notes.jsonl", None),
    ],
)
def test_parse_task(name, kind, source, split):
    spec = parse_task(name)
    assert (spec.kind, spec.source, spec.split) == (kind, source, split)
    assert spec.higher_is_better == (kind != "perplexity")


@pytest.mark.parametrize("name", ["", "ppl:", "my/notes.jsonl"])
def test_bad_task_names(name):
    with pytest.raises(ForgetlessError):
        parse_task(name)


def test_every_metric_kind_on_the_tiny_model(shared_data_dir, tmp_path):
    user_file = tmp_path / "notes.jsonl"
    user_file.write_text('{"text": "A short private note about anatomy."}\n' * 3)
    loaded = load_model("tiny-llama", device="cpu")
    config = EvalConfig(limit=6, scoring={"generation_max_new_tokens": 4}, task_limits={"c4": 2})
    tasks = ["arc_easy", "c4", "gsm8k", "ppl:pubmedqa", f"ppl:{user_file}"]
    results = evaluate_tasks(
        loaded.model, loaded.tokenizer, tasks, config, data_dir=shared_data_dir, progress=False
    )
    assert list(results) == tasks
    assert results["arc_easy"].n == 6 and 0 <= results["arc_easy"].value <= 1
    assert results["c4"].n == 2
    # An untrained byte-level model is close to uniform over its 259 tokens.
    assert 100 < results["c4"].value < 1000
    low, high = results["c4"].ci95
    assert low <= results["c4"].value <= high
    assert results["gsm8k"].metric == "exact_match"
    assert results[f"ppl:{user_file}"].n == 3
    assert "items" not in results["arc_easy"].to_dict()["details"]
    assert "per_item" not in results["arc_easy"].to_dict()
    # Per-item outcomes, for paired comparisons, agree with the aggregate metrics.
    correct = results["arc_easy"].per_item["correct"]
    assert len(correct) == 6 and sum(correct) / 6 == results["arc_easy"].value
    c4 = results["c4"].per_item
    mean_nll = sum(c4["document_nll"]) / sum(c4["document_tokens"])
    assert math.exp(mean_nll) == pytest.approx(results["c4"].value)
    assert len(results["gsm8k"].per_item["correct"]) == results["gsm8k"].n


def test_user_multiple_choice_and_plain_text_files_are_tasks(tmp_path):
    import json

    exams = tmp_path / "exams.jsonl"
    rows = [
        {"question": f"Question {i}: which letter comes first?", "options": ["a", "z"], "key": "A"}
        for i in range(5)
    ]
    exams.write_text("".join(json.dumps(row) + "\n" for row in rows))
    notes = tmp_path / "notes.txt"
    notes.write_text("A first note\nover two lines.\n\nA second note.\n")
    config = EvalConfig(
        tasks={
            "exams": {
                "source": str(exams),
                "metric": "accuracy",
                "columns": {"query": "question", "choices": "options", "gold": "key"},
            }
        }
    )
    assert parse_task("exams", config.tasks).kind == "multiple_choice"
    loaded = load_model("tiny-llama", device="cpu")
    results = evaluate_tasks(
        loaded.model, loaded.tokenizer, ["exams", f"ppl:{notes}"], config, progress=False
    )
    assert results["exams"].metric == "accuracy" and results["exams"].n == 5
    assert results[f"ppl:{notes}"].n == 2  # documents are separated by blank lines


def test_a_file_without_a_mapping_says_how_to_define_it():
    with pytest.raises(ForgetlessError, match="evaluate.tasks"):
        parse_task("my/exams.csv")


def test_a_killed_evaluation_resumes_at_the_first_unscored_task(
    shared_data_dir, tmp_path, monkeypatch
):
    import forgetless.evaluate.tasks as tasks_module
    from forgetless.evaluate.stages import FINISHED_TASKS_DIR, EvaluateStage
    from forgetless.model_config import ModelConfig
    from forgetless.runs import RunDirectory

    config = EvalConfig(limit=4, task_limits={"c4": 2})
    tasks = ["arc_easy", "c4", "ppl:pubmedqa"]

    def stage():
        return EvaluateStage(
            "eval_base",
            ModelConfig(name="tiny-llama", device="cpu"),
            config,
            tasks=tasks,
            data_dir=shared_data_dir,
        )

    scored, real_score = [], tasks_module.score_task

    def dies_on_the_third(model, tokenizer, spec, *args, **kwargs):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(spec.name)
        return real_score(model, tokenizer, spec, *args, **kwargs)

    monkeypatch.setattr(tasks_module, "score_task", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        RunDirectory(tmp_path / "killed").run(stage(), {})
    assert scored == ["arc_easy", "c4"]
    scored.clear()
    scored.append("room for one more")
    resumed = RunDirectory(tmp_path / "killed").run(stage(), {})
    assert scored == ["room for one more", "ppl:pubmedqa"]  # only the unscored task
    assert not (resumed.directory / FINISHED_TASKS_DIR).exists()

    monkeypatch.setattr(tasks_module, "score_task", real_score)
    whole = RunDirectory(tmp_path / "whole").run(stage(), {})
    for name in ("metrics.json", "items.json"):
        assert (resumed.directory / name).read_bytes() == (whole.directory / name).read_bytes()
