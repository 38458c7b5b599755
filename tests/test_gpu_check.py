"""The GPU check script in its CPU quick mode, as CI runs it (the full mode needs a GPU)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _figures(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _figures(item)
    elif isinstance(value, float):
        yield value


def test_quick_mode_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert list(parts) == [
        "environment", "osft_sizes", "grad_features", "end_to_end", "fsdp2_trainer"
    ]  # fmt: skip
    assert parts.pop("fsdp2_trainer") == {"status": "skipped", "seconds": 0.0, "why": "needs a GPU"}
    assert all(part["status"] == "ok" for part in parts.values()), parts
    assert all(math.isfinite(x) for x in _figures(parts))
    ratios = parts["osft_sizes"]["ratios"]
    assert set(ratios) == {"tiny-llama plain", "tiny-llama osft"}
    assert ratios["tiny-llama osft"]["time_ratio"] > 0
    assert parts["grad_features"]["samples"] == 8
    end_to_end = parts["end_to_end"]
    assert set(end_to_end["perplexity"]) == {"base", "osft", "merged"}
    # The update OSFT made on the device stays out of the preserved subspace (fp32 round-off).
    assert end_to_end["osft_update"]["worst_relative_leak"] < 1e-4
    assert end_to_end["osft_update"]["largest_update_norm"] > 0
    # Training on the domain file lowered its perplexity.
    domain = {name: ppl["domain"] for name, ppl in end_to_end["perplexity"].items()}
    assert domain["osft"] < domain["base"]
    assert "## end_to_end: ok" in (out / "summary.md").read_text()


def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --device cuda but torch sees no GPU; use --device cpu"
    ]
    assert not (tmp_path / "x").exists()
