"""The Navigator's inputs for every pool sample: none needs a backward pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from forgetless.data.records import Record
from forgetless.model_config import ModelConfig
from forgetless.select.config import SelectConfig

HEAD_COLUMNS = ("head_utility", "head_energy", "head_alignment")


def navigator_inputs(
    records: Sequence[Record],
    model: ModelConfig,
    select: SelectConfig,
    *,
    anchor: Sequence[Record] = (),
    validation: Sequence[Record] = (),
    progress: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """(samples, columns) float32 matrix of the configured features and the column names.

    ``anchor`` and ``validation`` are needed by the ``head_gradient`` feature only: the
    sample's utility, anchor energy and alignment computed as the exact scores are, from
    forward-only sketches of the output layer's gradient instead of the projected gradients.
    """
    from forgetless.embeddings import embed_texts, load_embedder, record_text
    from forgetless.models import load_configured_model, resolve_device
    from forgetless.select.gradients import sample_losses

    navigator = select.navigator.inputs
    blocks: list[np.ndarray] = []
    columns: list[str] = []
    if "embedding" in navigator.features:
        device = str(resolve_device(model.device))
        embedder = load_embedder(navigator.embedder, device=device)
        vectors = embed_texts(embedder, [record_text(r) for r in records], progress=progress)
        blocks.append(vectors)
        columns += [f"embedding_{i}" for i in range(vectors.shape[1])]
        del embedder
    if not {"length", "loss", "head_gradient"} & set(navigator.features):
        return np.concatenate(blocks, axis=1).astype(np.float32), columns
    loaded = load_configured_model(model)
    gradient = select.gradient
    if "head_gradient" in navigator.features:
        geometry, losses, counts = _head_geometry(
            loaded, records, anchor, validation, select, progress
        )
        blocks.append(geometry)
        columns += list(HEAD_COLUMNS)
    else:
        losses, counts = sample_losses(
            loaded.model,
            loaded.tokenizer,
            records,
            gradient.max_length,
            gradient.batch_size,
            progress=progress,
        )
    if "length" in navigator.features:
        blocks.append(np.log1p(counts.astype(np.float32))[:, None])
        columns.append("log_tokens")
    if "loss" in navigator.features:
        blocks.append(losses[:, None])
        columns.append("base_loss")
    return np.concatenate(blocks, axis=1).astype(np.float32), columns


def _head_geometry(loaded, records, anchor, validation, select: SelectConfig, progress: bool):
    from forgetless.errors import ForgetlessError
    from forgetless.select.head_sketch import head_gradient_sketches
    from forgetless.select.metrics import (
        anchor_from_gradients,
        cosine,
        domain_direction,
        orthogonality,
    )

    if not anchor or not validation:
        raise ForgetlessError("the head_gradient input needs the anchor and the validation data")
    inputs = select.navigator.inputs

    def sketch(part: Sequence[Record], description: str):
        return head_gradient_sketches(
            loaded.model,
            loaded.tokenizer,
            part,
            max_length=select.gradient.max_length,
            batch_size=select.gradient.batch_size,
            rows=inputs.head_sketch_rows,
            columns=inputs.head_sketch_columns,
            seed=select.seed,
            progress=progress,
            description=description,
        )

    anchor_sketch = sketch(anchor, "head sketches (anchor)")
    validation_sketch = sketch(validation, "head sketches (validation)")
    pool = sketch(records, "head sketches (pool)")
    anchor_space = anchor_from_gradients(
        anchor_sketch.vectors[anchor_sketch.tokens > 0], select.anchor_rank
    )
    target = domain_direction(validation_sketch.vectors[validation_sketch.tokens > 0])
    geometry = np.stack(
        [
            cosine(pool.vectors, target),
            1.0 - orthogonality(pool.vectors, anchor_space),
            cosine(pool.vectors, anchor_space.mean),
        ],
        axis=1,
    )
    # A sample with nothing to learn has no gradient: its geometry is zero, as its features are.
    geometry[pool.tokens == 0] = 0.0
    return geometry, pool.loss, pool.tokens
