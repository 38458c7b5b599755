"""The base of every configuration section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are almost always typos: reject them instead of silently ignoring them.
    # A NaN or infinite setting (a learning rate, a merge scale) can only produce a silently
    # wrong result, so no float of any section may be one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Marks a setting that says where logs go or how a run is labelled, never what it computes
# (`Field(..., json_schema_extra=NOT_IDENTITY)`): changing it must not invalidate cached stages
# or make a finished training run look like another one.
NOT_IDENTITY = {"identity": False}


def identity_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the NOT_IDENTITY settings, at any depth."""
    dumped = model.model_dump(mode="json")
    _drop_non_identity(model, dumped)
    return dumped


def _drop_non_identity(model: BaseModel, dumped: dict[str, Any]) -> None:
    for name, field in type(model).model_fields.items():
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra == NOT_IDENTITY:
            dumped.pop(name, None)
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _drop_non_identity(value, dumped[name])
