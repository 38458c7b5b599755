"""The base of every configuration section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are almost always typos: reject them instead of silently ignoring them.
    # A NaN or infinite setting (a learning rate, a merge scale) can only produce a silently
    # wrong result, so no float of any section may be one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
