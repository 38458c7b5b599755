"""The training stage: fine-tune the base model on records, resumably, into ``model/``.

The records are a data section, a data file identified by its content, or what an upstream
stage handed on (a selection, a mixture's sample).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetless.cards import Provenance
from forgetless.data.config import DataConfig
from forgetless.data.records import Record, read_records
from forgetless.digests import file_sha256
from forgetless.errors import ForgetlessError
from forgetless.hub import check_push_access, push_model
from forgetless.model_config import ModelConfig
from forgetless.runs import Stage, StageResult, StageSettings, records_file
from forgetless.train.config import TrainConfig

MODEL_DIR = "model"


class DataFileSettings(StageSettings):
    """A data file by its content: a moved or copied run directory stays cached."""

    sha256: str
    kind: str | None


class TrainSettings(StageSettings):
    model: ModelConfig
    # Exactly one says where the records come from; an upstream stage is identified by its
    # fingerprint, so both are then None.
    data: DataConfig | None
    data_file: DataFileSettings | None
    train: TrainConfig


class TrainStage(Stage):
    def __init__(
        self,
        name: str,
        model: ModelConfig,
        train: TrainConfig,
        *,
        data: DataConfig | None = None,
        data_file: str | Path | None = None,
        records_from: str | None = None,
        data_dir: str | None = None,
        progress: bool = True,
    ):
        if sum(x is not None for x in (data, data_file, records_from)) != 1:
            raise ValueError("give the records as data, data_file or records_from")
        self.name, self.data_dir, self.progress = name, data_dir, progress
        self.records_from = records_from
        self.data_file = None if data_file is None else Path(data_file)
        file_settings = None
        if self.data_file is not None:
            digest = file_sha256(self.data_file)
            file_settings = DataFileSettings(sha256=digest, kind=data.kind if data else "text")
            data = None
        self._settings = TrainSettings(model=model, data=data, data_file=file_settings, train=train)
        self.depends_on = (records_from,) if records_from else ()

    def settings(self) -> TrainSettings:
        return self._settings

    def records(self, inputs: dict[str, StageResult]) -> list[Record]:
        from forgetless.data import load_section, load_user_data

        settings = self._settings
        if settings.data is not None:
            return load_section(settings.data, self.data_dir)
        if self.data_file is not None:
            return load_user_data(self.data_file, settings.data_file.kind)
        return read_records(records_file(inputs[self.records_from]))

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.train.sft import CHECKPOINTS_DIR

        summary = train_into(
            self._settings,
            self.records(inputs),
            workdir,
            self.data_dir,
            records_from=self.records_from,
        )
        # Checkpoints exist only to resume an interrupted run; the finished stage keeps the
        # final model and drops them to save disk.
        shutil.rmtree(workdir / CHECKPOINTS_DIR, ignore_errors=True)
        return summary


def train_into(
    settings: TrainSettings,
    records: list[Record],
    output_dir: Path,
    data_dir: str | None,
    *,
    records_from: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    make_callbacks: Callable[[Any], list] | None = None,
) -> dict[str, Any]:
    """Fine-tune the settings' model on ``records`` into ``output_dir/model``; resumable.

    ``records_from`` names the upstream stage that handed the records on (for the model
    card). ``make_callbacks`` receives the loaded tokenizer and returns Trainer callbacks
    to add (they may need the tokenizer, which exists only once the model is loaded). With
    ``push_to_hub`` (a repository id) the access is checked before anything is loaded, and
    the finished model folder is uploaded (``private`` if the repository is new); the
    summary then holds its ``hub_url``.
    """
    from forgetless.models import load_configured_model
    from forgetless.train.sft import train_model

    if not records:
        raise ForgetlessError("no training records")
    if push_to_hub is not None:
        check_push_access(push_to_hub)
    loaded = load_configured_model(settings.model, for_training=True)
    _, result = train_model(
        loaded.model,
        loaded.tokenizer,
        records,
        settings.train,
        output_dir,
        callbacks=make_callbacks(loaded.tokenizer) if make_callbacks else (),
        data_dir=data_dir,
        provenance=_provenance(settings, records_from),
    )
    summary = {**result.to_dict(), "model_dir": MODEL_DIR, "records": len(records)}
    # One upload under torchrun / accelerate launch.
    if push_to_hub is not None and os.environ.get("RANK", "0") == "0":
        summary["hub_url"] = push_model(
            Path(output_dir) / MODEL_DIR,
            push_to_hub,
            private,
            f"forgetless: {settings.model.name} fine-tuned with {settings.train.method}",
        )
    return summary


def _provenance(settings: TrainSettings, records_from: str | None) -> Provenance:
    """The base model and the data as the model card names them."""
    model = settings.model
    if settings.data is not None:
        data = settings.data.model_dump(mode="json", exclude_none=True)
        return Provenance(model.name, data, (settings.data.source,), model.revision)
    if settings.data_file is not None:
        data = {"source": "a data file", "sha256": settings.data_file.sha256}
        return Provenance(model.name, {**data, "kind": settings.data_file.kind}, (), model.revision)
    source = f"the records of stage `{records_from}`" if records_from else "an upstream stage"
    return Provenance(model.name, {"source": source}, (), model.revision)
