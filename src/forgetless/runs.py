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

With an *archive* (another folder, e.g. one kept in version control), every finished stage
also leaves its record there under its fingerprint, and every stage folder no larger than
``archive_max_mb`` its files. A later run, in another run directory or on another machine,
restores archived folders instead of recomputing them, and does not rerun a stage whose files
were not archived (a model) when its own record is there and every stage after it is
available or reads only its summary (``Stage.summary_inputs``): such a result has only its
summary (``StageResult.artefacts`` is False). So a long experiment split across machines
that keep nothing but the archive carries on where it stopped, as long as what is left to
run does not need the missing files.

This module knows no method: it imports nothing of forgetless above ``errors`` and ``io``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from forgetless import __version__
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_directory, write_json_atomic
from forgetless.schema import identity_dump

STAGE_RECORD = "stage.json"
# In an archived stage folder that holds only the record (its files were too large to keep).
RECORD_ONLY = "RECORD_ONLY"


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
    # False for an archived stage whose files were not kept and that nothing left to run
    # needs: its summary is known, its directory does not exist.
    artefacts: bool = True


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
    # The inputs of which the stage reads only the summary (a report reads a training's
    # steps and seconds, never its model): an archived record of them serves, so a report
    # still to run does not retrain the models before it.
    summary_inputs: tuple[str, ...] = ()

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


# The states of a planned stage (RunDirectory.plan).
FINISHED = "finished"  # in this run directory
IN_ARCHIVE = "in archive"  # its files are archived: restored, not computed
ARCHIVED_RECORD = "archived record"  # only its record is archived, and nothing needs its files
TO_RUN = "to run"


@dataclass(frozen=True)
class PlannedStage:
    folder: str
    stage: str
    fingerprint: str
    state: str


def count_states(planned: Sequence[PlannedStage]) -> str:
    """How many planned stages are in each state: ``7 finished, 9 to run``."""
    counts = Counter(stage.state for stage in planned)
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def _ignore(event: str, info: StageResult | str) -> None:
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@dataclass
class RunDirectory:
    root: Path
    on_event: EventHandler = field(default=_ignore)
    archive: Path | None = None
    archive_max_mb: float = 16.0
    # fingerprint -> folder of every finished stage (read once, kept up to date)
    _index: dict[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise ForgetlessError(f"run directory {self.root} exists and is not a directory")
        if self.archive is not None:
            self.archive = Path(self.archive)
            if self.archive.exists() and not self.archive.is_dir():
                raise ForgetlessError(f"archive {self.archive} exists and is not a directory")

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

    # --- the archive ---------------------------------------------------------------------

    def _archived(self, fingerprint: str) -> Path | None:
        """The archive's folder of ``fingerprint``, if it holds a record of it."""
        if self.archive is None:
            return None
        folder = self.archive / fingerprint
        record_file = folder / STAGE_RECORD
        if not record_file.is_file():
            return None
        # The archive travels between machines and through version control: a damaged
        # record is said, never taken for a result nor silently replaced.
        try:
            recorded = json.loads(record_file.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != fingerprint:
            raise ForgetlessError(
                f"{record_file}: not the record of stage {fingerprint}; delete {folder} to "
                "compute that stage again"
            )
        return folder

    def archived_record(self, fingerprint: str) -> dict[str, Any] | None:
        """The archived record of a stage whose files were not kept."""
        folder = self._archived(fingerprint)
        if folder is None or not (folder / RECORD_ONLY).is_file():
            return None
        return json.loads((folder / STAGE_RECORD).read_text())

    def _restore(self, folder: str, fingerprint: str) -> StageResult | None:
        """The archived files of ``fingerprint``, copied to ``<root>/<folder>``."""
        archived = self._archived(fingerprint)
        if archived is None or (archived / RECORD_ONLY).exists():
            return None
        with atomic_directory(self.root / folder) as staging:
            shutil.copytree(archived, staging, dirs_exist_ok=True)
        return self.cached(folder, fingerprint)

    def _keep(self, result: StageResult) -> None:
        """Archive a finished stage: its whole folder if small enough, else its record."""
        if self.archive is None or self._archived(result.fingerprint) is not None:
            return
        small = _folder_bytes(result.directory) <= self.archive_max_mb * 2**20
        with atomic_directory(self.archive / result.fingerprint) as staging:
            if small:
                shutil.copytree(result.directory, staging, dirs_exist_ok=True)
            else:
                shutil.copy2(result.directory / STAGE_RECORD, staging / STAGE_RECORD)
                (staging / RECORD_ONLY).write_text(
                    "The files of this stage were larger than the archive keeps.\n"
                )

    def available(self, folder: str, fingerprint: str) -> bool:
        """Whether ``fingerprint``'s files are here, elsewhere in the run or in the archive."""
        return (
            self.cached(folder, fingerprint) is not None
            or self._finished_elsewhere(fingerprint) is not None
            or (
                self._archived(fingerprint) is not None
                and self.archived_record(fingerprint) is None
            )
        )

    # --- running ---------------------------------------------------------------------------

    def run(
        self, stage: Stage, inputs: Mapping[str, StageResult], folder: str | None = None
    ) -> StageResult:
        """Run ``stage`` (or reuse its finished result) in ``<root>/<folder or its name>``."""
        missing = [name for name in stage.depends_on if name not in inputs]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing} to run first")
        folder = folder or stage.name
        fingerprint = stage.fingerprint({name: inputs[name].fingerprint for name in inputs})
        hit = (
            self.cached(folder, fingerprint)
            or self._finished_elsewhere(fingerprint)
            or self._restore(folder, fingerprint)
        )
        if hit is not None:
            self._keep(hit)
            self.on_event("cached", hit)
            return hit
        absent = [
            name
            for name in stage.depends_on
            if not inputs[name].artefacts and name not in stage.summary_inputs
        ]
        if absent:
            raise ValueError(f"stage {stage.name} needs the files of {absent}, which were not kept")
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
        self._keep(result)
        self.on_event("done", result)
        return result

    def run_all(
        self,
        stages: Sequence[Stage],
        *,
        given: Mapping[str, StageResult] | None = None,
        keep: Collection[str] = (),
    ) -> dict[str, StageResult]:
        """Run stages in the given (topological) order, skipping those already finished."""
        return self.run_plans({"": stages}, given=given, keep=keep)[""]

    def run_plans(
        self,
        plans: Mapping[str, Sequence[Stage]],
        *,
        given: Mapping[str, StageResult] | None = None,
        keep: Collection[str] = (),
    ) -> dict[str, dict[str, StageResult]]:
        """Run several plans (the arms of a comparison), each distinct stage once.

        Fingerprints are known before anything runs, so the same work that several plans
        need (the base evaluation, a selection's gradients, an expert that is also an arm of
        its own) runs once. It lives in ``<root>/<name>`` when every plan's stage of that name
        is the same, else in ``<root>/<plan>/<name>`` of the first plan that needs it.

        ``given``: results from elsewhere (another run directory) that stages may consume.
        With an archive, a stage whose files were not archived is not rerun when its record
        is there, some stage consumes it and none that does needs to run, unless its name is
        in ``keep`` (stages whose files the caller reads besides the last ones).
        """
        given = dict(given or {})
        fingerprints, folders, to_run = self._layout(plans, given, keep)
        finished: dict[str, StageResult] = {}
        outcome: dict[str, dict[str, StageResult]] = {}
        for plan, stages in plans.items():
            results: dict[str, StageResult] = dict(given)
            for stage in stages:
                fingerprint = fingerprints[plan][stage.name]
                if fingerprint not in finished:
                    if fingerprint in to_run:
                        finished[fingerprint] = self.run(
                            stage, results, folder=folders[fingerprint]
                        )
                    else:
                        finished[fingerprint] = self._recorded(stage, fingerprint, folders)
                results[stage.name] = finished[fingerprint]
            outcome[plan] = {name: result for name, result in results.items() if name not in given}
        return outcome

    def _layout(
        self,
        plans: Mapping[str, Sequence[Stage]],
        given: Mapping[str, StageResult],
        keep: Collection[str],
    ) -> tuple[dict[str, dict[str, str]], dict[str, str], set[str]]:
        """Each plan's stage fingerprints, the folder of each distinct stage, and which of
        them run (or are reused) rather than stay archived records."""
        fingerprints: dict[str, dict[str, str]] = {}
        for plan, stages in plans.items():
            known = {name: result.fingerprint for name, result in given.items()}
            for stage in stages:
                if stage.name in known:
                    raise ValueError(f"plan {plan!r} has two stages named {stage.name!r}")
                known[stage.name] = stage.fingerprint(known)
            fingerprints[plan] = known
        variants: dict[str, set[str]] = {}
        for plan, stages in plans.items():
            for stage in stages:
                variants.setdefault(stage.name, set()).add(fingerprints[plan][stage.name])
        folders: dict[str, str] = {}
        for plan, stages in plans.items():
            for stage in stages:
                # The first plan that needs a stage of a contested name hosts it.
                shared = len(variants[stage.name]) == 1
                folder = stage.name if shared or not plan else f"{plan}/{stage.name}"
                folders.setdefault(fingerprints[plan][stage.name], folder)
        return fingerprints, folders, self._stages_to_run(plans, fingerprints, folders, keep)

    def plan(
        self,
        plans: Mapping[str, Sequence[Stage]],
        *,
        given: Mapping[str, StageResult] | None = None,
        keep: Collection[str] = (),
    ) -> list[PlannedStage]:
        """What :meth:`run_plans` would do with the same arguments, doing nothing: every
        distinct stage in the order it would run, with its folder and its state."""
        fingerprints, folders, to_run = self._layout(plans, dict(given or {}), keep)
        listed: dict[str, PlannedStage] = {}
        for plan, stages in plans.items():
            for stage in stages:
                fingerprint = fingerprints[plan][stage.name]
                if fingerprint not in listed:
                    folder = folders[fingerprint]
                    state = self._state(folder, fingerprint, fingerprint in to_run)
                    listed[fingerprint] = PlannedStage(folder, stage.name, fingerprint, state)
        return list(listed.values())

    def _state(self, folder: str, fingerprint: str, runs: bool) -> str:
        if not runs:
            return ARCHIVED_RECORD
        if self.cached(folder, fingerprint) or self._finished_elsewhere(fingerprint):
            return FINISHED
        archived = self._archived(fingerprint)
        if archived is not None and not (archived / RECORD_ONLY).exists():
            return IN_ARCHIVE
        return TO_RUN

    def _stages_to_run(self, plans, fingerprints, folders, keep) -> set[str]:
        """Every stage, but those whose files are only archived as a record and that no
        stage left to run needs (or that ``keep`` names)."""
        every = set(folders)
        if self.archive is None:
            return every
        present = {fp for fp in every if self.available(folders[fp], fp)}
        recorded = {fp for fp in every - present if self.archived_record(fp) is not None}
        # Who reads each stage's files; which stages any stage reads, if only their summary.
        consumers: dict[str, set[str]] = {fp: set() for fp in every}
        read: set[str] = set()
        for plan, stages in plans.items():
            for stage in stages:
                fingerprint = fingerprints[plan][stage.name]
                if stage.name in keep:
                    recorded.discard(fingerprint)
                for name in stage.depends_on:
                    upstream = fingerprints[plan][name]
                    read.add(upstream)
                    if name not in stage.summary_inputs and upstream in consumers:
                        consumers[upstream].add(fingerprint)
        # What no stage reads is what the caller reads: it is never left as a record.
        recorded &= read
        to_run = every - recorded - present
        # Stages that a stage left to run consumes must run too, and so on upstream.
        changed = True
        while changed:
            needed = {fp for fp in recorded - to_run if consumers[fp] & to_run}
            to_run |= needed
            changed = bool(needed)
        return every - (recorded - to_run)

    def _recorded(self, stage: Stage, fingerprint: str, folders: dict[str, str]) -> StageResult:
        record = self.archived_record(fingerprint)
        assert record is not None  # _stages_to_run skips only recorded stages
        result = StageResult(
            stage.name,
            fingerprint,
            self.root / folders[fingerprint],
            record["summary"],
            True,
            record.get("seconds"),
            artefacts=False,
        )
        self.on_event("archived", result)
        return result


def run_directory(root: str | Path, config: Any, on_event: EventHandler | None = None):
    """``root`` as a :class:`RunDirectory` with the archive of ``config`` (a forgetless
    config: its ``archive_dir`` and ``archive_max_mb``)."""
    return RunDirectory(
        Path(root),
        on_event=on_event or _ignore,
        archive=None if config.archive_dir is None else Path(config.archive_dir),
        archive_max_mb=config.archive_max_mb,
    )
