"""Which model to adapt, and how to load it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgetless.schema import LOCAL_CHECKPOINT, Section


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="Hub id, local checkpoint directory, or alias: smollm2-135m, tiny-llama, "
        "or random:<shape> (randomly initialised, for speed and memory work; shapes in "
        "forgetless.model_shapes).",
        json_schema_extra=LOCAL_CHECKPOINT,
    )
    revision: str | None = Field(
        None,
        description="Branch, tag or commit of a hub model to load (pin it for reproducible "
        "runs); default: the main branch. Not for local checkpoints or aliases.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on a bf16-capable GPU, else float32."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = Field(
        False, description="Allow custom model code from the hub. Only set for repos you trust."
    )
