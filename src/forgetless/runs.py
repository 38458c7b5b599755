"""The stage engine: stages, their results, and the run directory that caches them.

A stage declares the stages it consumes and a frozen *settings* model holding everything
else that determines its output; the two give it a fingerprint. A stage reads nothing of
the configuration but its settings, so its identity cannot drift from what it computes.
``RunDirectory.run`` executes a stage in ``<run>/<folder>.partial-<fingerprint>/`` and,
once it finished, renames that folder to ``<run>/<folder>/`` with a ``stage.json`` record:

* a finished stage with the same fingerprint is skipped on the next run (cached);
* a stage killed half-way leaves only its partial folder, which the next run with the same
  fingerprint reuses (training resumes from its last checkpoint there);
* a changed setting changes the fingerprint of the stage and of everything downstream.

This module knows no method: it imports nothing of forgetless above ``errors`` and ``io``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from forgetless import __version__
from forgetless.errors import ForgetlessError
from forgetless.io import write_json_atomic
from forgetless.schema import identity_dump

STAGE_RECORD = "stage.json"


class StageSettings(BaseModel):
    """What a stage's output depends on besides its inputs; frozen, so it is a value."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class StageResult:
    name: str
    fingerprint: str
    directory: Path
    summary: dict[str, Any]
    cached: bool
    seconds: float | None = None  # wall time of the run that finished it


def records_file(result: StageResult) -> Path:
    """The records a stage handed on: a stage producing training records (a selection, a
    mixture's sample) names their file under ``records_file`` in its summary."""
    path = (result.directory / result.summary["records_file"]).resolve()
    # The name is read back from stage.json: it must not lead out of the stage's folder.
    if not path.is_relative_to(result.directory.resolve()):
        raise ForgetlessError(f"{result.directory / STAGE_RECORD}: records_file leaves the stage")
    return path


class Stage(ABC):
    """One step of a run. Subclasses write their artefacts into ``workdir`` only."""

    name: str = ""
    depends_on: tuple[str, ...] = ()

    @abstractmethod
    def settings(self) -> BaseModel:
        """Everything besides the upstream outputs that determines this stage's artefacts."""

    @abstractmethod
    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        """Produce the artefacts in ``workdir``; return a JSON-able summary."""

    def fingerprint(self, inputs: Mapping[str, str]) -> str:
        """The stage's identity: what it computes (its class and settings) from which inputs
        (their fingerprints). Not its name: the same work under two names is one result."""
        kind = type(self)
        payload = {
            # A new release may compute a stage differently, so it invalidates the cache.
            "forgetless": __version__,
            "stage": f"{kind.__module__}.{kind.__qualname__}",
            "settings": identity_dump(self.settings()),
            "inputs": [inputs[name] for name in self.depends_on],
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


EventHandler = Callable[[str, "StageResult | str"], None]


def _ignore(event: str, info: StageResult | str) -> None:
    return None


@dataclass
class RunDirectory:
    root: Path
    on_event: EventHandler = field(default=_ignore)
    # fingerprint -> folder of every finished stage (read once, kept up to date)
    _index: dict[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise ForgetlessError(f"run directory {self.root} exists and is not a directory")

    def _finished_elsewhere(self, fingerprint: str) -> StageResult | None:
        """The same work finished under another folder (another name, another arm)."""
        if self._index is None:
            self._index = {}
            for depth in ("*", "*/*"):
                for record_file in self.root.glob(f"{depth}/{STAGE_RECORD}"):
                    try:
                        recorded = json.loads(record_file.read_text())["fingerprint"]
                    except (OSError, ValueError, KeyError):
                        continue
                    self._index[recorded] = str(record_file.parent.relative_to(self.root))
        folder = self._index.get(fingerprint)
        return None if folder is None else self.cached(folder, fingerprint)

    def cached(self, folder: str, fingerprint: str) -> StageResult | None:
        record_file = self.root / folder / STAGE_RECORD
        if not record_file.is_file():
            return None
        record = json.loads(record_file.read_text())
        if record.get("fingerprint") != fingerprint:
            return None
        name = record.get("stage", folder)
        seconds = record.get("seconds")
        return StageResult(name, fingerprint, record_file.parent, record["summary"], True, seconds)

    def run(
        self, stage: Stage, inputs: Mapping[str, StageResult], folder: str | None = None
    ) -> StageResult:
        """Run ``stage`` (or reuse its finished result) in ``<root>/<folder or its name>``."""
        missing = [name for name in stage.depends_on if name not in inputs]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing} to run first")
        folder = folder or stage.name
        fingerprint = stage.fingerprint({name: inputs[name].fingerprint for name in inputs})
        hit = self.cached(folder, fingerprint) or self._finished_elsewhere(fingerprint)
        if hit is not None:
            self.on_event("cached", hit)
            return hit
        self.on_event("start", folder)
        partial = self.root / f"{folder}.partial-{fingerprint}"
        partial.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        summary = stage.run(partial, dict(inputs))
        seconds = time.perf_counter() - started
        record = {
            "stage": stage.name,
            "fingerprint": fingerprint,
            "inputs": {name: inputs[name].fingerprint for name in stage.depends_on},
            "settings": identity_dump(stage.settings()),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "summary": summary,
        }
        write_json_atomic(partial / STAGE_RECORD, record)
        final = self.root / folder
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for stale in final.parent.glob(f"{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        result = StageResult(stage.name, fingerprint, final, summary, False, seconds)
        if self._index is not None:
            self._index[fingerprint] = folder
        self.on_event("done", result)
        return result

    def run_all(self, stages: Sequence[Stage]) -> dict[str, StageResult]:
        """Run stages in the given (topological) order, skipping those already finished."""
        return self.run_plans({"": stages})[""]

    def run_plans(self, plans: Mapping[str, Sequence[Stage]]) -> dict[str, dict[str, StageResult]]:
        """Run several plans (the arms of a comparison), each distinct stage once.

        Fingerprints are known before anything runs, so the same work that several plans
        need (the base evaluation, a selection's gradients, an expert that is also an arm of
        its own) runs once. It lives in ``<root>/<name>`` when every plan's stage of that name
        is the same, else in ``<root>/<plan>/<name>`` of the first plan that needs it.
        """
        fingerprints: dict[str, dict[str, str]] = {}
        for plan, stages in plans.items():
            known: dict[str, str] = {}
            for stage in stages:
                if stage.name in known:
                    raise ValueError(f"plan {plan!r} has two stages named {stage.name!r}")
                known[stage.name] = stage.fingerprint(known)
            fingerprints[plan] = known
        variants: dict[str, set[str]] = {}
        for known in fingerprints.values():
            for name, fingerprint in known.items():
                variants.setdefault(name, set()).add(fingerprint)
        finished: dict[str, StageResult] = {}
        outcome: dict[str, dict[str, StageResult]] = {}
        for plan, stages in plans.items():
            results: dict[str, StageResult] = {}
            for stage in stages:
                fingerprint = fingerprints[plan][stage.name]
                if fingerprint not in finished:
                    # The first plan that needs a stage of a contested name hosts it.
                    shared = len(variants[stage.name]) == 1
                    folder = stage.name if shared or not plan else f"{plan}/{stage.name}"
                    finished[fingerprint] = self.run(stage, results, folder=folder)
                results[stage.name] = finished[fingerprint]
            outcome[plan] = results
        return outcome
