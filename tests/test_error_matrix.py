"""The error contract, command by command: a user mistake gives exit code 2, one line on
stderr that names the culprit (the file and line, or the flag), no traceback, and no new file.

Each case is (command line, what the line must name). Inputs are made fresh in a temporary
folder, which is also the working directory, so anything a failing command leaves behind
shows up as a new file. docs/errors.md lists the categories and the count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# --- inputs ----------------------------------------------------------------------------------


def _inputs(root: Path) -> None:
    (root / "good.jsonl").write_text('{"text": "a fine document"}\n' * 3)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    (root / "wrongtype.jsonl").write_text('{"text": 42}\n')
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (root / "short.csv").write_text("text,label\nfine,1\nbroken\n")
    (root / "exams.jsonl").write_text('{"question": "q?", "options": ["a", "b"], "answer": "C"}\n')
    (root / "bad.yaml").write_text("train:\n  learning_rate: [1\n")
    (root / "notmapping.yaml").write_text("- a list\n")
    (root / "typo.yaml").write_text("train:\n  learnig_rate: 1.0e-4\n")
    (root / "nan.yaml").write_text("train:\n  learning_rate: .nan\n")
    (root / "user_task.yaml").write_text(
        "evaluate:\n  tasks:\n    exams: {source: exams.jsonl, metric: accuracy}\n"
    )
    (root / "mapped_task.yaml").write_text(
        "evaluate:\n  tasks:\n    exams: {source: exams.jsonl, metric: accuracy,\n"
        "      columns: {query: question, choices: options, gold: answer}}\n"
    )
    (root / "arms_none.yaml").write_text("model: {name: tiny-llama}\n")
    (root / "arms_eval.yaml").write_text(
        "model: {name: tiny-llama}\ncompare:\n  arms:\n    a: {evaluate: {limit: 2}}\n"
    )
    (root / "arms_sweep.yaml").write_text(
        "model: {name: tiny-llama}\ncompare:\n  arms:\n    a: {sweep: {train.learning_rate: 3}}\n"
    )
    (root / "arms_list.yaml").write_text(
        "model: {name: tiny-llama}\ncompare:\n  arms: [full, lora]\n"
    )
    (root / "metrics_nan.json").write_text(json.dumps({"c4": {"value": 1.0}}))
    (root / "metrics_bad.json").write_text('{"c4": \n')
    (root / "a_file").write_text("not a folder")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("x")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny-llama checkpoint, a truncated copy, and one of another architecture."""
    from forgetless.models import load_model

    root = tmp_path_factory.mktemp("checkpoints")
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(root / "good")
    loaded.tokenizer.save_pretrained(root / "good")
    weights = (root / "good" / "model.safetensors").read_bytes()
    (root / "trunc").mkdir()
    for file in (root / "good").iterdir():
        (root / "trunc" / file.name).write_bytes(file.read_bytes())
    (root / "trunc" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "other").mkdir()
    for file in (root / "good").iterdir():
        (root / "other" / file.name).write_bytes(file.read_bytes())
    config = json.loads((root / "good" / "config.json").read_text())
    config["hidden_size"] += 8
    (root / "other" / "config.json").write_text(json.dumps(config))
    (root / "notok").mkdir()
    (root / "notok" / "config.json").write_text((root / "good" / "config.json").read_text())
    return root


# --- the cases -------------------------------------------------------------------------------

TINY = ["--model", "tiny-llama"]
TRAIN = ["train", "--output-dir", "out", *TINY, "--max-steps", "1", "--max-length", "16"]
EVAL = ["eval", *TINY, "--limit", "2"]
MERGE = ["merge", "--base", "tiny-llama", "--experts", "tiny-llama", "--output-dir", "m"]
SELECT = ["select", "--output-dir", "out", *TINY, "--limit", "12"]
RUN = [
    "run",
    "--config",
    "arms_none.yaml",
    "--set",
    "data.source=good.jsonl",
    "--set",
    "evaluate.general_tasks=[c4]",
    "--set",
    "evaluate.domain_tasks=['ppl:good.jsonl']",
    "--set",
    "train.max_length=16",
]

CASES: dict[str, list[tuple[list[str], str]]] = {
    "missing file or folder": [
        ([*TRAIN, "--data", "nope.jsonl"], "nope.jsonl"),
        ([*TRAIN, "--config", "nope.yaml"], "config file not found: nope.yaml"),
        ([*EVAL, "--tasks", "ppl:nope.jsonl"], "nope.jsonl"),
        (["eval", "--model", "./no/model", "--tasks", "c4"], "no/model"),
        (["run", "--config", "nope.yaml"], "nope.yaml"),
        (
            ["lm-eval", "run", "--model", "tiny-llama", "--tasks", "t", "--include-path", "nope"],
            "include path",
        ),
        (["compare", "--config", "nope.yaml"], "nope.yaml"),
        (["continual", "--config", "nope.yaml"], "nope.yaml"),
        (["merge", "--base", "tiny-llama", "--experts", "./nope", "--output-dir", "m"], "nope"),
        ([*SELECT, "--data", "nope.jsonl"], "nope.jsonl"),
        (["mix", "cluster", "--output-dir", "out", "--sources", "nope.jsonl"], "nope.jsonl"),
        (
            [
                "report",
                "--base-metrics",
                "nope.json",
                "--adapted-metrics",
                "nope.json",
                "--domain-tasks",
                "c4",
                "--general-tasks",
                "c4",
                "--output-dir",
                "r",
            ],
            "nope.json",
        ),
        (
            ["mix", "sample", "--output-dir", "out", "--tokens", "100", "--output", "x.jsonl"],
            "mix search",
        ),
    ],
    "empty input (or too little text to train on)": [
        ([*TRAIN, "--data", "empty.jsonl"], "empty.jsonl: no records found"),
        ([*EVAL, "--tasks", "ppl:empty.jsonl"], "empty.jsonl"),
        (
            [*TRAIN, "--data", "good.jsonl", "--set", "evaluate.domain_tasks=['']"],
            "evaluate.domain_tasks",
        ),
        (["eval", *TINY, "--tasks", " , "], "--tasks needs at least one task name"),
        (
            [*RUN, "--set", "train.max_length=512"],
            "fewer than one block of train.max_length=512",
        ),
    ],
    "malformed at a line": [
        ([*TRAIN, "--data", "bad.jsonl"], "bad.jsonl:3: invalid JSON"),
        ([*TRAIN, "--data", "short.csv"], "short.csv:3: 1 fields but the header has 2"),
        ([*TRAIN, "--config", "bad.yaml"], "bad.yaml:3: invalid YAML"),
        ([*EVAL, "--tasks", "ppl:bad.jsonl"], "bad.jsonl:3"),
        ([*SELECT, "--data", "bad.jsonl"], "bad.jsonl:3"),
        (
            [
                "report",
                "--base-metrics",
                "metrics_bad.json",
                "--adapted-metrics",
                "metrics_bad.json",
                "--domain-tasks",
                "c4",
                "--general-tasks",
                "c4",
                "--output-dir",
                "r",
            ],
            "metrics_bad.json:2: invalid JSON",
        ),
        (["run", "--config", "notmapping.yaml"], "the top level must be a mapping"),
    ],
    "wrong type": [
        (
            [*TRAIN, "--data", "wrongtype.jsonl"],
            "wrongtype.jsonl:1: column 'text' must be a string",
        ),
        ([*TRAIN, "--set", "train.warmup_steps=abc"], "--set train.warmup_steps"),
        (
            [*TRAIN, "--config", "typo.yaml"],
            "typo.yaml:2: invalid config value for train.learnig_rate",
        ),
        (
            [*EVAL, "--tasks", "exams", "--config", "user_task.yaml"],
            "exams.jsonl:1: missing column 'query'",
        ),
        (
            [*EVAL, "--tasks", "exams", "--config", "mapped_task.yaml"],
            "exams.jsonl:1: column 'answer'",
        ),
        (["compare", "--config", "arms_sweep.yaml"], "sweep.train.learning_rate: give a list"),
        (
            ["compare", "--config", "arms_list.yaml"],
            "arms_list.yaml: compare.arms: expected a mapping of arm names",
        ),
        (
            [
                "report",
                "--base-metrics",
                "metrics_nan.json",
                "--adapted-metrics",
                "metrics_nan.json",
                "--domain-tasks",
                "arc_easy",
                "--general-tasks",
                "c4",
                "--output-dir",
                "r",
            ],
            "arc_easy",
        ),
    ],
    "not UTF-8": [
        ([*TRAIN, "--data", "latin1.jsonl"], "latin1.jsonl:1: not valid UTF-8"),
        ([*EVAL, "--tasks", "ppl:latin1.jsonl"], "latin1.jsonl:1: not valid UTF-8"),
    ],
    "wrong kind of path": [
        (
            [
                "train",
                "--output-dir",
                "a_file",
                *TINY,
                "--data",
                "good.jsonl",
                "--max-steps",
                "1",
                "--max-length",
                "16",
            ],
            "a_file",
        ),
        (
            [*TRAIN, "--data", "good.jsonl", "--data-dir", "a_file"],
            "--data-dir: invalid value for data_dir: a_file is not",
        ),
        (["eval", "--model", "a_file", "--tasks", "c4"], "a_file"),
        (["merge", "--base", "a_file", "--experts", "a_file", "--output-dir", "m"], "a_file"),
        ([*RUN, "--output-dir", "a_file"], "a_file"),
        ([*SELECT, "--output-dir", "a_file"], "a_file"),
        ([*RUN, "--set", "archive_dir=a_file"], "archive a_file exists and is not a directory"),
    ],
    "output in the way": [
        (
            [
                "merge",
                "--base",
                "tiny-llama",
                "--experts",
                "tiny-llama",
                "--output-dir",
                "nonempty",
            ],
            "nonempty exists and is not empty",
        ),
        (["run", "--config", "arms_eval.yaml"], "forgetless compare --config"),
    ],
    "corrupt or mismatched checkpoint": [
        (
            ["merge", "--base", "<good>", "--experts", "<trunc>", "--output-dir", "m"],
            "model.safetensors: not a readable safetensors file",
        ),
        (
            ["merge", "--base", "<good>", "--experts", "<other>", "--output-dir", "m"],
            "hidden_size is",
        ),
        (["eval", "--model", "<trunc>", "--tasks", "c4", "--limit", "1"], "trunc"),
        (["eval", "--model", "<notok>", "--tasks", "c4", "--limit", "1"], "has no tokenizer"),
    ],
    "out of range or not finite": [
        ([*TRAIN, "--learning-rate", "nan"], "--learning-rate: invalid value"),
        ([*TRAIN, "--learning-rate", "inf"], "--learning-rate: invalid value"),
        ([*TRAIN, "--learning-rate", "-1"], "--learning-rate: invalid value"),
        (
            [*TRAIN, "--config", "nan.yaml"],
            "nan.yaml:2: invalid config value for train.learning_rate",
        ),
        ([*TRAIN, "--batch-size", "0"], "--batch-size"),
        ([*TRAIN, "--limit", "0"], "--limit"),
        (["eval", *TINY, "--set", "evaluate.limit=-3", "--tasks", "c4"], "--set evaluate.limit"),
        ([*SELECT, "--budget", "1.5"], "--budget"),
        (
            [
                *MERGE,
                "--keep",
                "0",
            ],
            "--keep",
        ),
        (
            [
                *MERGE,
                "--scale",
                "inf",
            ],
            "--scale",
        ),
        (
            ["mix", "sample", "--output-dir", "out", "--tokens", "0", "--output", "x.jsonl"],
            "--tokens",
        ),
        (["mix", "search", "--output-dir", "out", "--rounds", "8,a"], "--rounds"),
        (["mix", "search", "--output-dir", "out", "--rounds", "0"], "mix.search.rounds"),
        (["mix", "cluster", "--output-dir", "out", "--clusters", "1"], "--clusters"),
        (["continual", "--order", "9", "--set", "model.name=tiny-llama"], "has no order 9"),
        (["continual", "--eval-limit", "0"], "--eval-limit"),
        ([*TRAIN, "--set", "train.lr_scheduler=cosin"], "not a transformers scheduler"),
    ],
    "unknown name": [
        ([*EVAL, "--tasks", "no_such_task"], "no_such_task"),
        (["lm-eval", "export", "--tasks", "no_such_task", "--output-dir", "out"], "no_such_task"),
        ([*TRAIN, "--data", "no_such_set"], "no_such_set"),
        ([*TRAIN, "--method", "qlora"], "train.method 'qlora' is not one of"),
        ([*TRAIN, "--data", "pubmedqa", "--split", "dev"], "has no split 'dev'"),
        ([*TRAIN, "--data", "pubmedqa", "--kind", "dialogue"], "--kind"),
        ([*SELECT, "--method", "best"], "select.method 'best'"),
        (
            [
                *MERGE,
                "--method",
                "average",
            ],
            "merge.method 'average'",
        ),
        (["continual", "--method", "gem"], "continual.method 'gem'"),
        (
            ["mix", "search", "--output-dir", "out", "--set", "mix.search.targets={arc_easy: 1}"],
            "arc_easy",
        ),
        (["data", "info", "no_such_set"], "unknown data set 'no_such_set'"),
        (["methods", "no_family"], "unknown method family"),
        (
            [
                *TRAIN,
                "--set",
                "train.lora.target_modules=[nope]",
                "--method",
                "lora",
                "--data",
                "good.jsonl",
            ],
            "train.lora.target_modules",
        ),
        ([*TRAIN, "--set", "nosection.x=1"], "nosection"),
        (
            ["eval", "--model", "tiny-llama", "--tasks", "c4", "--set", "model.device=tpu"],
            "invalid device 'tpu'",
        ),
    ],
}

PARAMS = [
    pytest.param(argv, needle, id=f"{category}: {' '.join(argv[:2])} {needle[:30]}")
    for category, cases in CASES.items()
    for argv, needle in cases
]


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.parametrize(("argv", "needle"), PARAMS)
def test_a_user_mistake_is_one_line_exit_2_and_leaves_nothing(
    argv, needle, tmp_path, monkeypatch, run_cli, checkpoints, shared_data_dir
):
    work = tmp_path / "work"
    work.mkdir()
    _inputs(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("FORGETLESS_CACHE_DIR", str(tmp_path / "cache"))
    for checkpoint in checkpoints.iterdir():
        argv = [arg.replace(f"<{checkpoint.name}>", str(checkpoint)) for arg in argv]
    before = _files(work)
    code, _, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert _files(work) == before, sorted(_files(work) - before)


def test_the_matrix_covers_every_command():
    from forgetless.cli import COMMAND_NAMES

    tested = {" ".join(argv[:2]) if argv[0] in ("mix", "data", "lm-eval") else argv[0]
              for cases in CASES.values() for argv, _ in cases}  # fmt: skip
    # demo runs compare's code path on a packaged file; config takes no input.
    assert set(COMMAND_NAMES) - tested <= {"demo", "config", "data list"}


def test_the_docs_list_the_matrix():
    text = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for category, cases in CASES.items():
        assert f"| {category} | {len(cases)} |" in text
    assert f"| **all** | **{sum(map(len, CASES.values()))}** |" in text
