"""The base of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are almost always typos: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
