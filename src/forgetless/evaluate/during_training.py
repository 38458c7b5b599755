"""Held-out losses measured while a model trains, at chosen optimizer steps.

A final evaluation says how much a run forgot, not when: whether a held-out loss first falls
and then rises, or rises from the first step, tells a first-order effect of the data's
gradients from the drift that many steps accumulate. The Hugging Face Trainer evaluates only
every N steps and reports one pooled loss; this callback scores perplexity tasks at any
steps (log-spaced ones resolve the start, where first-order effects live) and keeps the
per-document sums, so that two runs on the same documents compare paired.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.tasks import load_tasks, score_task
from forgetless.io import write_json_atomic


class HeldOutLosses(TrainerCallback):
    """Scores the perplexity ``tasks`` at each of ``steps`` (0: before the first update) and
    writes every measurement to ``output`` as it is taken, so that a resumed run keeps the
    steps measured before its interruption and measures only the rest."""

    def __init__(
        self,
        tokenizer,
        tasks: list[str],
        steps: Iterable[int],
        config: EvalConfig,
        output: Path,
        *,
        data_dir: str | None = None,
        progress: bool = False,
    ):
        self.tokenizer, self.config = tokenizer, config
        self.output, self.progress = output, progress
        self.steps = sorted(set(steps))
        if not self.steps or self.steps[0] < 0:
            raise ForgetlessError("held-out loss steps must be zero or positive")
        self.tasks = load_tasks(tasks, config, data_dir=data_dir)
        others = [name for name, (spec, _) in self.tasks.items() if spec.kind != "perplexity"]
        if others:
            raise ForgetlessError(
                f"held-out losses during training are perplexity tasks; not {', '.join(others)}"
            )
        self.measured: dict[str, Any] = json.loads(output.read_text()) if output.is_file() else {}

    def _measure(self, model, step: int) -> None:
        if step not in self.steps or str(step) in self.measured:
            return
        scores = {}
        for name, (spec, records) in self.tasks.items():
            result = score_task(
                model, self.tokenizer, spec, records, self.config, progress=self.progress
            )
            nll = result.per_item["document_nll"]
            if not all(math.isfinite(value) for value in nll):
                raise ForgetlessError(f"{name} at step {step}: a document's loss is not finite")
            scores[name] = {"mean_nll": result.details["mean_nll"], **result.per_item}
        self.measured[str(step)] = scores
        write_json_atomic(self.output, self.measured)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # One process scores while the others wait; a sharded model cannot run alone.
            raise ForgetlessError("held-out losses during training need a single process")
        if state.is_world_process_zero and state.global_step == 0:
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._measure(model, state.global_step)
