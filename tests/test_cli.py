"""The command line: help everywhere, one-line errors without traceback, no partial output."""

import json
import subprocess
import sys

import pytest

from forgetless.cli import main

COMMANDS = [
    "train",
    "eval",
    "report",
    "run",
    "compare",
    "demo",
    "methods",
    "continual",
    "merge",
    "select",
    "mix",
    "mix cluster",
    "mix search",
    "mix sample",
    "lm-eval",
    "lm-eval export",
    "lm-eval run",
    "config",
    "data",
    "data list",
    "data info",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command, run_cli):
    code, out, _ = run_cli([*command.split(), "--help"])
    assert code == 0
    assert "Usage" in out


def test_version_and_short_help(run_cli):
    from forgetless import __version__

    code, out, _ = run_cli(["--version"])
    assert code == 0 and out.startswith(f"forgetless {__version__} (torch ")
    code, out, _ = run_cli(["train", "-h"])
    assert code == 0 and "--output-dir" in out


def test_help_lists_choices_and_defaults(run_cli, monkeypatch):
    from forgetless import registry

    monkeypatch.setenv("COLUMNS", "250")  # no cell of the help table folded

    code, out, _ = run_cli(["train", "--help"])
    assert code == 0
    help_text = " ".join(out.replace("│", " ").split())
    assert f"[{'|'.join(registry.names('train'))}]" in help_text
    assert "[default: (0.0001)]" in help_text  # train.learning_rate's documented default
    code, out, _ = run_cli(["continual", "--help"])
    # The continual command's defaults are those of its packaged config, not the schema's.
    assert "[default: (seqft)]" in " ".join(out.replace("│", " ").split())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "--base", "b", "--experts", "e", "--output", "m"], "--output was renamed"),
        (["run", "--run-dir", "r"], "--run-dir was renamed --output-dir"),
        (["mix", "sample", "--output-dir", "r", "--tokens", "9", "--to", "f"], "--to was renamed"),
    ],
)
def test_renamed_output_flags_say_their_new_name(argv, message, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv)
    _assert_one_line_error(code, err, message)
    assert not list(tmp_path.iterdir())


def test_train_json_is_the_whole_stdout(tmp_path, run_cli):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(f'{{"text": "note {i} about a patient"}}\n' for i in range(40)))
    argv = ["train", "--model", "tiny-llama", "--data", str(data), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--max-length", "16", "--output-dir", str(tmp_path / "out")]
    argv += ["--set", "train.logging_steps=1", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    summary = json.loads(out)  # the Trainer's log lines went to stderr
    assert summary["steps"] == 2 and "'loss'" in err
    code, out, _ = run_cli(argv[:-1])  # finished: a no-op, shown as a table
    assert code == 0 and "steps" in out and not out.lstrip().startswith("{")


def test_config_prints_documented_defaults(capsys, tmp_path):
    from forgetless.config import ForgetlessConfig, load_config

    main(["config"])
    out = capsys.readouterr().out
    assert "learning_rate: 0.0001" in out and "# Peak learning rate" in out
    # The printed file is a valid config that loads back to the defaults.
    saved = tmp_path / "defaults.yaml"
    saved.write_text(out)
    assert load_config(saved) == ForgetlessConfig()


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_malformed_jsonl_names_file_and_line(tmp_path, run_cli):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    output = tmp_path / "out"
    code, _, err = run_cli(
        ["train", "--model", "tiny-llama", "--data", str(data), "--output-dir", str(output)]
    )
    _assert_one_line_error(code, err, "bad.jsonl:3")
    assert not output.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--model", "tiny-llama", "--tasks", "no_such_task"], "no_such_task"),
        (
            ["train", "--output-dir", "x", "--data", "no_such_set", "--model", "tiny-llama"],
            "no_such_set",
        ),
        (["train", "--output-dir", "x", "--method", "qlora"], "train.method"),
        (["eval", "--model", "./no/such/model", "--tasks", "c4"], "no/such/model"),
        (["eval", "--bogus-flag"], "bogus-flag"),
        (["run", "--config", "missing.yaml"], "missing.yaml"),
        (["eval", "--set", "evaluate.limit=-3", "--tasks", "c4"], "evaluate.limit"),
        (["select", "--output-dir", "x", "--method", "best"], "select.method"),
        (["select", "--output-dir", "x", "--budget", "1.5"], "select.budget"),
        (["mix", "cluster", "--output-dir", "x", "--sources", "no_such_set"], "no_such_set"),
        (["mix", "cluster", "--output-dir", "x", "--clusters", "1"], "mix.cluster.clusters"),
        (["mix", "search", "--output-dir", "x", "--rounds", "8,a"], "--rounds"),
        (
            ["mix", "search", "--output-dir", "x", "--set", "mix.search.targets={arc_easy: 1}"],
            "arc_easy",
        ),
        (
            ["mix", "sample", "--output-dir", "x", "--tokens", "100", "--output", "x.jsonl"],
            "mix search",
        ),
        (
            ["select", "--output-dir", "x", "--set", "select.validation_samples=100000"],
            "validation_samples",
        ),
    ],
)
def test_user_mistakes_give_one_line(argv, needle, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv)
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x").exists()


def test_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgetless.cli",
            "eval",
            "--tasks",
            "nope",
            "--model",
            "tiny-llama",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")


def test_report_command_from_metrics_files(tmp_path, capsys):
    entry = {"metric": "perplexity", "value": 10.0, "higher_is_better": False, "ci95": None, "n": 5}
    base, adapted = tmp_path / "base.json", tmp_path / "adapted.json"
    base.write_text(json.dumps({"c4": entry, "ppl:pubmedqa": entry}))
    adapted.write_text(
        json.dumps({"c4": {**entry, "value": 11.0}, "ppl:pubmedqa": {**entry, "value": 8.0}})
    )
    main(
        [
            "report",
            "--base-metrics",
            str(base),
            "--adapted-metrics",
            str(adapted),
            "--domain-tasks",
            "ppl:pubmedqa",
            "--general-tasks",
            "c4",
            "--output-dir",
            str(tmp_path / "report"),
        ]
    )
    out = capsys.readouterr().out
    assert "| general | c4 | perplexity | 10.000 | 11.000 | +1.00 | -10.0 % |" in out
    assert (tmp_path / "report" / "report.png").is_file()


@pytest.mark.parametrize(
    ("adapted", "needle"),
    [
        ({"c4": {"metric": "perplexity", "value": 11.0}}, "task 'c4' lacks higher_is_better"),
        ({"c4": {"metric": "perplexity", "value": float("nan"), "higher_is_better": False}},
         "task 'c4' has value nan, not a finite number"),
        ({"c4": {"metric": "perplexity", "value": "11", "higher_is_better": False}},
         "task 'c4' has value '11', not a finite number"),
        ({"arc_easy": {}}, "task 'c4' is missing"),
        ({"c4": 11.0}, "task 'c4' is not an object of metrics"),
        ([1, 2], "expected an object of task metrics"),
    ],
)  # fmt: skip
def test_a_malformed_metrics_file_names_itself_and_writes_nothing(
    adapted, needle, tmp_path, run_cli
):
    entry = {"metric": "perplexity", "value": 10.0, "higher_is_better": False}
    base, broken = tmp_path / "base.json", tmp_path / "adapted.json"
    base.write_text(json.dumps({"c4": entry}))
    broken.write_text(json.dumps(adapted))  # NaN as JSON allows it: the token NaN
    code, _, err = run_cli(
        [
            "report",
            "--base-metrics", str(base),
            "--adapted-metrics", str(broken),
            "--domain-tasks", "c4",
            "--general-tasks", "c4",
            "--output-dir", str(tmp_path / "report"),
        ]
    )  # fmt: skip
    _assert_one_line_error(code, err, str(broken), needle)
    assert not (tmp_path / "report").exists()


def test_run_end_to_end_then_cached(tmp_path, run_cli):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        """
model: {name: tiny-llama, device: cpu}
data: {source: pubmedqa, kind: text, split: train, limit: 20}
train: {max_steps: 2, batch_size: 2, max_length: 32, save_steps: 1}
evaluate:
  domain_tasks: ["ppl:pubmedqa"]
  general_tasks: [arc_easy, c4]
  task_limits: {"ppl:pubmedqa": 3, arc_easy: 4, c4: 2}
"""
    )
    run_dir = tmp_path / "run"
    argv = ["run", "--config", str(config), "--output-dir", str(run_dir)]
    code, out, err = run_cli([*argv, "--dry-run", "--json"])
    assert code == 0 and not run_dir.exists()
    planned = json.loads(out)
    assert [(p["folder"], p["state"]) for p in planned] == [
        ("eval_base", "to run"), ("train", "to run"), ("eval_adapted", "to run"),
        ("report", "to run"),
    ]  # fmt: skip
    assert "dry run: 4 to run" in err
    assert run_cli(argv)[0] == 0
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [row["task"] for row in report["rows"]] == ["ppl:pubmedqa", "arc_easy", "c4"]
    assert report["summary"]["train_steps"] == 2
    assert (run_dir / "train" / "model" / "model.safetensors").is_file()
    assert not (run_dir / "train" / "checkpoints").exists()
    assert not list(run_dir.glob("*.partial-*"))
    items = json.loads((run_dir / "eval_adapted" / "items.json").read_text())
    assert len(items["arc_easy"]["correct"]) == 4 and len(items["c4"]["document_nll"]) == 2

    code, out, err = run_cli(argv)
    assert code == 0
    assert err.count("cached") == 4
    assert "| domain | ppl:pubmedqa | perplexity |" in out

    code, out, _ = run_cli([*argv, "--set", "train.max_steps=3", "--dry-run", "--json"])
    assert [p["state"] for p in json.loads(out)] == ["finished", "to run", "to run", "to run"]
    code, _, err = run_cli([*argv, "--set", "train.max_steps=3"])
    assert code == 0
    assert err.count("cached") == 1  # only the base evaluation is unaffected
