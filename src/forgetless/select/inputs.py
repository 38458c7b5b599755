"""The Navigator's gradient-free inputs for every pool sample."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from forgetless.data.records import Record
from forgetless.model_config import ModelConfig
from forgetless.select.config import SelectConfig


def navigator_inputs(
    records: Sequence[Record], model: ModelConfig, select: SelectConfig, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """(samples, columns) float32 matrix of the configured features and the column names."""
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
    if {"length", "loss"} & set(navigator.features):
        loaded = load_configured_model(model)
        gradient = select.gradient
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
