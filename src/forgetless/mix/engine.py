"""Ray Data engine for the two per-document passes of clustering: embedding and
nearest-centroid assignment (``mix.engine: ray``).

Both are plain ``map_batches`` over the documents, so they scale out to a Ray cluster
(``RAY_ADDRESS``) unchanged; on a single machine a local Ray instance is started. k-means
itself is trained on the driver with faiss, as with the local engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from forgetless.errors import ForgetlessError


def _ray():
    try:
        import ray
    except ImportError:
        raise ForgetlessError("mix.engine=ray needs Ray Data: pip install 'ray[data]'") from None
    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    return ray


class _Embed:
    """One embedder per Ray actor, loaded once and reused for every batch it gets."""

    def __init__(self, embedder: str, device: str | None, batch_size: int):
        from forgetless.embeddings import load_embedder

        self.model = load_embedder(embedder, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from forgetless.embeddings import embed_texts

        vectors = embed_texts(self.model, list(batch["text"]), self.batch_size, progress=False)
        return {"row": batch["row"], "embedding": list(vectors)}


def ray_embed_batches(
    texts: Sequence[str],
    embedder: str,
    batch_size: int,
    device: str | None = None,
):
    """Yield ``(first row, embeddings)`` batches of ``texts`` in input order, embedded by a
    pool of Ray actors (one model each) over a single pass."""
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    embedded = dataset.map_batches(
        _Embed,
        fn_constructor_kwargs={"embedder": embedder, "device": device, "batch_size": batch_size},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=max(1, int(ray.available_resources().get("CPU", 1)) // 2),
    )
    for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield int(batch["row"][0]), np.stack(batch["embedding"]).astype(np.float32)


def ray_assign(vectors: np.ndarray, centroids: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Nearest centroid (largest cosine) of every row, computed in Ray batches."""
    ray = _ray()
    centroids_ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))

    def assign(batch: dict) -> dict:
        # ray.get of an ObjectRef captured in the closure: shipped once per worker.
        scores = np.stack(batch["vector"]).astype(np.float32) @ ray.get(centroids_ref).T
        return {"row": batch["row"], "cluster": scores.argmax(1)}

    dataset = ray.data.from_items(
        [{"row": i, "vector": vector} for i, vector in enumerate(np.asarray(vectors))]
    )
    rows = dataset.map_batches(assign, batch_size=batch_size, batch_format="numpy").take_all()
    rows.sort(key=lambda row: int(row["row"]))
    return np.array([int(row["cluster"]) for row in rows], dtype=np.int64)
