"""Ray Data engine for the two per-document passes of clustering: embedding and
nearest-centroid assignment (``mix.engine: ray``), and the nearest-centroid search both
engines run on a block of rows.

The two Ray passes are ``map_batches`` over ``ray.data.range`` of the row numbers, each
worker reading its rows itself (texts from the pool, vectors from the embeddings file), so no
pass ships the whole pool through the driver. They scale out to a Ray cluster
(``RAY_ADDRESS``) unchanged, given files every node sees at the same path; on a single machine
a local Ray instance is started. k-means itself is trained on the driver with faiss, as with
the local engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

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


def nearest_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (largest cosine) of every row of an in-memory block."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64)


def _contiguous(rows: np.ndarray) -> tuple[int, int]:
    # Ray Data hands out runs of consecutive row numbers from a range; check rather than assume.
    start, stop = int(rows[0]), int(rows[-1]) + 1
    if stop - start != len(rows):
        raise ForgetlessError("a Ray batch of rows is not contiguous")
    return start, stop


class _Embed:
    """One embedder per Ray actor, loaded once and reused for every batch it gets."""

    def __init__(self, texts: list, first: int, embedder: str, device: str | None, batch_size: int):
        import ray

        from forgetless.embeddings import load_embedder

        # The text source travels once per actor, through the object store.
        self.texts = ray.get(texts[0])
        self.first = first
        self.model = load_embedder(embedder, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from forgetless.embeddings import embed_texts

        rows = batch["id"] + self.first
        start, stop = _contiguous(rows)
        vectors = embed_texts(self.model, self.texts[start:stop], self.batch_size, progress=False)
        return {"row": rows, "embedding": vectors}


def ray_embed_batches(
    texts: Sequence[str],
    first: int,
    embedder: str,
    batch_size: int,
    device: str | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first row, embeddings)`` batches of ``texts[first:]`` in order, embedded by a
    pool of Ray actors (one model each) over a single pass. ``texts`` is a list or a
    ``TextFile``; each actor reads its own rows from it."""
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    embedded = ray.data.range(len(texts) - first).map_batches(
        _Embed,
        fn_constructor_kwargs={
            "texts": [ray.put(texts)],
            "first": first,
            "embedder": embedder,
            "device": device,
            "batch_size": batch_size,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=max(1, int(ray.available_resources().get("CPU", 1)) // 2),
    )
    for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield int(batch["row"][0]), np.asarray(batch["embedding"], dtype=np.float32)


def _assign(batch: dict, matrix_file: str, centroids: list) -> dict:
    """Nearest centroid of the rows of a batch, read from the embeddings file by the worker."""
    import ray

    start, stop = _contiguous(batch["id"])
    # Mapped per batch and released with it: a worker holds one batch of vectors.
    vectors = np.array(np.load(matrix_file, mmap_mode="r")[start:stop])
    return {"row": batch["id"], "cluster": nearest_centroids(vectors, ray.get(centroids[0]))}


def ray_assign(
    matrix_file: str | Path, count: int, centroids: np.ndarray, batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first row, nearest centroid of each row)`` in row order over the ``count``
    rows of the ``.npy`` file ``matrix_file``, computed in Ray batches."""
    ray = _ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # Tasks, not actors: Ray Data fuses them with the read of the row numbers, where an actor
    # pool as large as the cluster would leave no CPU for that read and wait forever.
    assigned = ray.data.range(count).map_batches(
        _assign,
        fn_kwargs={
            "matrix_file": str(matrix_file),
            "centroids": [ray.put(np.ascontiguousarray(centroids, dtype=np.float32))],
        },
        batch_size=batch_size,
        batch_format="numpy",
    )
    for batch in assigned.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield int(batch["row"][0]), batch["cluster"].astype(np.int64)
