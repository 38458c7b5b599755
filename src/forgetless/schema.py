"""The base of every configuration section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from forgetless.digests import local_content


class Section(BaseModel):
    # Unknown keys are almost always typos: reject them instead of silently ignoring them.
    # A NaN or infinite setting (a learning rate, a merge scale) can only produce a silently
    # wrong result, so no float of any section may be one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Marks a setting that says where logs go or how a run is labelled, never what it computes
# (`Field(..., json_schema_extra=NOT_IDENTITY)`): changing it must not invalidate cached stages
# or make a finished training run look like another one.
NOT_IDENTITY = {"identity": False}


# Marks a setting that names data or a model, which may be a local file or folder (a data set
# name, a task, a checkpoint): in the identity the path is replaced by the digest of what it
# holds, so an edited file or a retrained checkpoint is not mistaken for the old one and a
# moved one is still recognised. Names of no local path stay as they are, and so do their
# fingerprints.
LOCAL_CONTENT = {"identity": "content"}
# The same for a setting that names a model: a local checkpoint folder is identified by its
# own files (what ``from_pretrained`` reads), not by the training checkpoints below it.
LOCAL_CHECKPOINT = {"identity": "checkpoint"}


def added_setting(off: Any) -> dict[str, Any]:
    """Marks a setting added to a stage after results were cached or archived, whose value
    ``off`` computes exactly what the stage computed before it existed
    (``Field(..., json_schema_extra=added_setting(0))``): at that value it is left out of the
    identity, so switching the new behaviour off keeps the old stages' fingerprints."""
    return {"identity_omitted_at": off}


def identity_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the NOT_IDENTITY settings and with local paths
    of LOCAL_CONTENT settings replaced by their content's digest, at any depth."""
    dumped = model.model_dump(mode="json")
    _identity(model, dumped)
    return dumped


def _identity(model: BaseModel, dumped: dict[str, Any]) -> None:
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if extra == NOT_IDENTITY:
            dumped.pop(name, None)
            continue
        value = getattr(model, name)
        if isinstance(extra, dict) and "identity_omitted_at" in extra:
            if value == extra["identity_omitted_at"]:
                dumped.pop(name, None)
            continue
        if extra in (LOCAL_CONTENT, LOCAL_CHECKPOINT):
            dumped[name] = _by_content(dumped[name], extra == LOCAL_CHECKPOINT)
        if isinstance(value, BaseModel):
            _identity(value, dumped[name])
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    _identity(item, dumped[name][key])


def _by_content(dumped: Any, checkpoint: bool) -> Any:
    """A name, or each string of a list or dict, with a local path replaced by its digest."""
    if isinstance(dumped, list):
        return [_by_content(item, checkpoint) for item in dumped]
    if isinstance(dumped, dict):
        return {key: _by_content(item, checkpoint) for key, item in dumped.items()}
    if not isinstance(dumped, str):
        return dumped
    local = local_content(dumped, checkpoint=checkpoint)
    if local is None:
        return dumped
    path, digest = local
    return dumped.replace(path, f"sha256:{digest}", 1)
