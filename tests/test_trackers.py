"""Experiment trackers: train.report_to reaches the Trainer, and reports are logged as well."""

import json
import sys
import types

import pytest

from forgetless.report.trackers import (
    Trackers,
    frontier_scalars,
    log_report,
    retention_scalars,
)

pytest.importorskip("tensorboard", reason="TensorBoard is in the dev extra")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

REPORT = {
    "rows": [
        {
            "group": "domain",
            "task": "ppl:pubmedqa",
            "metric": "perplexity",
            "after": 12.5,
            "improvement_pct": 7.5,
        },
        {
            "group": "general",
            "task": "arc_easy",
            "metric": "accuracy",
            "after": 0.5,
            "improvement_pct": None,  # a base value of 0: no relative change
        },
    ],
    "summary": {"domain_improvement_pct": 7.5, "general_improvement_pct": None},
}


def _notes(tmp_path, count=40):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(f'{{"text": "note {i} on a patient visit"}}\n' for i in range(count)))
    return data


def _scalars(folder) -> dict[str, float]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_writes_training_events(tmp_path, run_cli):
    output = tmp_path / "out"
    argv = ["train", "--model", "tiny-llama", "--data", str(_notes(tmp_path)), "--json"]
    argv += ["--max-steps", "2", "--batch-size", "2", "--max-length", "16"]
    argv += ["--output-dir", str(output), "--set", "train.logging_steps=1"]
    code, _, err = run_cli([*argv, "--set", "train.report_to=tensorboard"])
    assert code == 0, err
    runs = list((output / "checkpoints" / "runs").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))
    logged = _scalars(runs[0])
    assert {"train/loss", "train/learning_rate"} <= set(logged)

    # Where logs go is not what the run is: the finished run is not refused or retrained.
    code, out, err = run_cli([*argv, "--set", "train.report_to=none"])
    assert code == 0, err
    assert json.loads(out)["steps"] == 2


def test_a_missing_tracker_fails_before_any_work(tmp_path, run_cli, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(
        transformers.integrations, "get_available_reporting_integrations", lambda: []
    )
    output = tmp_path / "out"
    argv = ["train", "--model", "tiny-llama", "--data", str(_notes(tmp_path))]
    argv += ["--output-dir", str(output), "--report-to", "tensorboard"]
    code, _, err = run_cli(argv)
    assert code == 2 and err.strip().splitlines() == [
        "error: train.report_to: tensorboard is not installed; install its package "
        "(e.g. pip install tensorboard) or drop it"
    ]
    assert not output.exists()


def test_unknown_tracker_is_a_config_error(tmp_path, run_cli):
    code, _, err = run_cli(
        ["train", "--output-dir", str(tmp_path / "o"), "--set", "train.report_to=tensorbored"]
    )
    assert code == 2 and "unknown tracker 'tensorbored'" in err


def test_retention_report_logged_to_tensorboard(tmp_path):
    scalars = retention_scalars(REPORT)
    assert scalars == {
        "domain/ppl:pubmedqa/perplexity": 12.5,
        "domain/ppl:pubmedqa/improvement_pct": 7.5,
        "general/arc_easy/accuracy": 0.5,
        "summary/domain_improvement_pct": 7.5,
    }
    Trackers(report_to=("tensorboard",)).log(tmp_path, "retention", scalars, "| a | b |")
    logged = _scalars(tmp_path / "runs")
    assert logged == pytest.approx({f"retention/{key}": value for key, value in scalars.items()})


def test_frontier_scalars_per_arm():
    frontier = {
        "arms": [
            {"label": "full", "x": -9.0, "y": -10.1, "pareto": False},
            {"label": "lora", "x": 12.7, "y": 6.6, "pareto": True},
        ]
    }
    assert frontier_scalars(frontier) == {
        "full/domain_gain": -9.0,
        "full/general_retention": -10.1,
        "full/pareto": 0.0,
        "lora/domain_gain": 12.7,
        "lora/general_retention": 6.6,
        "lora/pareto": 1.0,
    }


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_wandb_style_trackers_get_one_run_per_report(tracker, tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kwargs: calls.append(("init", kwargs)),
        log=lambda data: calls.append(("log", data)),
        finish=lambda: calls.append(("finish",)),
        Html=lambda html: ("html", html),
    )
    monkeypatch.setitem(sys.modules, tracker, fake)
    log_report(
        [tracker],
        tmp_path,
        name="frontier",
        scalars={"lora/domain_gain": 12.7},
        markdown="| <arm> |",
        project="forgetless",
    )
    assert calls == [
        ("init", {"project": "forgetless", "name": "frontier", "config": {"report": "frontier"}}),
        ("log", {"frontier/lora/domain_gain": 12.7}),
        ("log", {"frontier/table": ("html", "<pre>| &lt;arm&gt; |</pre>")}),
        ("finish",),
    ]
    assert not list(tmp_path.iterdir())  # nothing written locally by a remote tracker


def test_a_recipe_logs_its_retention_report_once(tmp_path, run_cli, shared_data_dir):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
model: {{name: tiny-llama, device: cpu}}
data: {{source: pubmedqa, kind: text, split: train, limit: 8}}
train: {{max_steps: 1, batch_size: 2, max_length: 32, report_to: tensorboard}}
evaluate:
  domain_tasks: ["ppl:pubmedqa"]
  general_tasks: [arc_easy]
  task_limits: {{"ppl:pubmedqa": 2, arc_easy: 2}}
data_dir: {shared_data_dir}
"""
    )
    run_dir = tmp_path / "run"
    argv = ["run", "--config", str(config), "--output-dir", str(run_dir), "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    report = json.loads(out)
    logged = _scalars(run_dir / "report" / "runs")
    assert logged == pytest.approx(
        {f"retention/{key}": value for key, value in retention_scalars(report).items()}
    )
    events = sorted((run_dir / "report" / "runs").iterdir())
    assert run_cli(argv)[0] == 0
    assert sorted((run_dir / "report" / "runs").iterdir()) == events  # cached: not logged again
