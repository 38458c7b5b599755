"""Reruns and interruptions on the tiny model: a finished command run again changes no byte,
and a run killed at a random point then rerun ends with the bytes of an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TINY = {
    "model": {"name": "tiny-llama"},
    "data": {"source": "pubmedqa", "kind": "text", "split": "train", "limit": 40},
    "train": {"max_steps": 8, "batch_size": 2, "max_length": 64, "save_steps": 2},
    "evaluate": {"domain_tasks": ["ppl:pubmedqa@test"], "general_tasks": ["c4"], "limit": 6},
}
# What a run's result is; timings and stage records may differ between runs.
RESULT_FILES = ("*.safetensors", "metrics.json", "items.json", "selected.jsonl", "*.npz")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for pattern in RESULT_FILES
        for path in root.rglob(pattern)
        if ".partial" not in str(path) and "checkpoints" not in path.parts
    }


def _everything(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def test_finished_commands_run_again_change_no_byte(tmp_path, run_cli, shared_data_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "run")}))
    commands = {
        "run": ["run", "--config", str(config)],
        "train": ["train", "--config", str(config), "--output-dir", str(tmp_path / "train")],
        "select": [
            "select", "--config", str(config), "--output-dir", str(tmp_path / "select"),
            "--method", "random", "--budget", "0.5", "--set", "select.validation.samples=4",
        ],
        "mix": [
            "mix", "cluster", "--config", str(config), "--output-dir", str(tmp_path / "mix"),
            "--sources", "pubmedqa@train", "c4", "--limit-per-source", "10", "--clusters", "3",
        ],
    }  # fmt: skip
    for name, argv in commands.items():
        code, _, err = run_cli(argv)
        assert code == 0, (name, err)
        first = _everything(tmp_path)
        code, _, err = run_cli(argv)
        assert code == 0, (name, err)
        assert _everything(tmp_path) == first, name
    merge = ["merge", "--base", "tiny-llama", "--experts", str(tmp_path / "train" / "model")]
    code, _, _ = run_cli([*merge, "--output-dir", str(tmp_path / "merged")])
    assert code == 0
    first = _snapshot(tmp_path / "merged")
    code, _, _ = run_cli([*merge, "--output-dir", str(tmp_path / "merged"), "--overwrite"])
    assert code == 0 and _snapshot(tmp_path / "merged") == first


def _run(config: Path, kill_after: float | None = None) -> int:
    command = [sys.executable, "-m", "forgetless.cli", "run", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )  # fmt: skip
    if kill_after is None:
        return process.wait(timeout=600)
    try:
        return process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up: as a power cut
        process.wait()
        return -9


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_run_killed_anywhere_then_rerun_ends_with_the_same_bytes(tmp_path, shared_data_dir):
    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path / name)}))
        return path

    started = time.perf_counter()
    assert _run(config("whole")) == 0
    duration = time.perf_counter() - started
    reference = _snapshot(tmp_path / "whole")
    assert any(name.endswith("model.safetensors") for name in reference)
    # Kill points spread over the run (imports, evaluation, training, saving), seeded.
    rng = random.Random(0)
    for attempt, fraction in enumerate(sorted(rng.uniform(0.3, 0.95) for _ in range(2))):
        killed = config(f"killed{attempt}")
        _run(killed, kill_after=fraction * duration)
        assert _run(killed) == 0
        assert _snapshot(tmp_path / f"killed{attempt}") == reference, fraction
        assert not list((tmp_path / f"killed{attempt}").glob("*.partial-*"))
